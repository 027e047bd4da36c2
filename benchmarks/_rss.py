"""Host-memory measurement shared by the benchmark scripts: resident memory (VmRSS) sampled in a thread."""

from __future__ import annotations

import threading
import time


def resident_mb() -> float:
    """This process's resident memory in MB (Linux ``/proc/self/status``; NaN elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class _Sampler:
    """Context manager calling :meth:`_sample` with VmRSS every 5 ms in a thread while the block runs."""

    def _sample(self, value: float) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._done.is_set():
            self._sample(resident_mb())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self._sample(resident_mb())


class PeakRSS(_Sampler):
    """VmRSS sampled every 5 ms in a thread; ``start`` and ``peak`` (MB) after exit."""

    def __enter__(self) -> PeakRSS:
        self.start = resident_mb()
        self.samples = [self.start]
        return super().__enter__()

    def _sample(self, value: float) -> None:
        self.samples.append(value)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.peak = max(self.samples)


class PhasePeaks(_Sampler):
    """VmRSS sampled every 5 ms in a thread and credited to the phase running: :meth:`wrap` makes a function
    set its phase while it runs (nested calls: the innermost); ``peaks`` maps each phase to its peak (MB)."""

    def __init__(self, first: str = "other") -> None:
        self.current = first
        self.peaks: dict[str, float] = {}

    def wrap(self, name: str, fn):
        """``fn`` with the phase ``name`` set while it runs (and its resident memory on return recorded)."""

        def wrapped(*args, **kwargs):
            outer, self.current = self.current, name
            try:
                return fn(*args, **kwargs)
            finally:
                self._record(name, resident_mb())
                self.current = outer

        return wrapped

    def _record(self, name: str, value: float) -> None:
        self.peaks[name] = max(self.peaks.get(name, value), value)

    def _sample(self, value: float) -> None:
        self._record(self.current, value)
