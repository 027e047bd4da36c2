"""Where the time of a SCAR training step goes, part by part, on this machine (issue 23).

Usage::

    python benchmarks/profile_step.py                                 # 10000x2000, binomial and NB, batch 128
    python benchmarks/profile_step.py --likelihoods b --repeats 7 --steps 16

Method: timing of the step's parts, each compiled alone and run over the same ``--steps`` minibatches
(``lax.scan``, so a call is one dispatch), interleaved with the whole step and repeated ``--repeats`` times;
the fastest repeat counts (other jobs on a shared machine only slow a run down). The parts are written from
the model's own functions (``scar_jax.nets``, ``scar_jax.likelihoods``, ``scar_jax.vae``) and the trained
configuration's parameters, with inputs that are the forward pass's own intermediates:

* densify minibatch: ``CsrCounts.take`` (gather of the rows' stored entries, scatter into ``(B, G)``);
* encoder / decoder matmuls: the Dense layers' products and biases;
* activation/normalisation: ``log1p(x)``, the hidden ReLUs, ``exp`` of the variance head, ``softplus_sp`` and
  the row normalisation of the native frequencies, ``(1 + tanh) / 2`` of the noise ratio;
* mixture: ``(1 - eps) phi + eps a``;
* likelihood kernel: ``log_prob_kernel`` (``x log p + (N - x) log(1 - p)`` with the clamps; the NB's whole
  log-probability); likelihood ``c(x)``: the parameter-free part the diet takes out of the step
  (``log C(N, x)`` via ``betaln``; for NB/ZINB, where ``c = 0`` inside the step, the ``lgamma(x + 1)`` that
  separating it would add);
* KL; BatchNorm (the four hidden layers, training mode);
* forward (whole loss, measured), forward + backward (``value_and_grad``, measured), backward = their
  difference; optimizer update (``tx.update`` + ``apply_updates``); the whole compiled epoch divided by
  its steps; validation (the compiled validation pass of the epoch, divided by the epoch's steps).

Each part's forward time is listed, and its forward + backward time (gradient with respect to its
parameters and the inputs that carry gradient) for the breakdown of the backward row. Parts timed alone
do not fuse with their neighbours as they do inside the step, so their sum differs from the measured
forward; the difference is printed. "before" is the step evaluating ``c(x)`` per entry (``Batch`` without
``log_constant``), "after" the step adding the precomputed per-cell constant; both run in the same process,
interleaved. The compiled step's cost analysis (XLA's FLOP, transcendental and byte counts) is printed for
both.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scar_jax import __version__
from scar_jax.counts import to_device
from scar_jax.datasets import simulate
from scar_jax.likelihoods import (
    cell_log_constants,
    has_log_constant,
    log_binomial_coefficient,
    log_prob_kernel,
    make_likelihood,
    mixture_probs,
)
from scar_jax.nets import BATCHNORM_EPS, VAR_EPS, row_normalize, softplus_sp, tanh01
from scar_jax.train import CellData, init_train_state, make_evaluate, make_optimizer, make_train_epoch, split_indices
from scar_jax.vae import Outputs, SCARConfig, init_variables, kl_local, loss_terms

Tree = dict


def _dense(p: Tree, h: jax.Array) -> jax.Array:
    return h @ p["kernel"] + p["bias"]


def _batchnorm(p: Tree, h: jax.Array) -> jax.Array:
    mean = h.mean(0)
    var = ((h - mean) ** 2).mean(0)
    return (h - mean) * jax.lax.rsqrt(var + BATCHNORM_EPS) * p["scale"] + p["bias"]


def intermediates(params: Tree, x: jax.Array, noise: jax.Array, sparsity: float) -> dict[str, jax.Array]:
    """The forward pass of one minibatch in training mode, keeping the inputs each part is timed on."""
    enc, dec = params["encoder"], params["decoder"]
    out = {"lx": jnp.log1p(x)}
    h = out["lx"]
    for side, net in (("enc", enc), ("dec", dec)):
        if side == "dec":
            out["z"] = h = out["z_mean"] + jnp.sqrt(out["z_var"]) * noise
        for i in range(2):
            out[f"{side}_in{i}"] = h
            out[f"{side}_pre{i}"] = pre = _dense(net["hidden"][f"dense_{i}"], h)
            out[f"{side}_bn{i}"] = bn = _batchnorm(net["hidden"][f"batchnorm_{i}"], pre)
            h = jax.nn.relu(bn)
        out[f"{side}_h"] = h
        if side == "enc":
            out["z_mean"] = _dense(enc["mean"], h)
            out["log_var"] = _dense(enc["log_var"], h)
            out["z_var"] = jnp.exp(out["log_var"]) + VAR_EPS
    out["v"] = _dense(dec["native_frequencies"], h)
    out["u"] = _dense(dec["noise_ratio"], h)
    out["phi"] = row_normalize(softplus_sp(out["v"], sparsity))
    out["eps"] = tanh01(out["u"])
    return out


def part_functions(
    config: SCARConfig, params: Tree, counts, ambient: jax.Array
) -> dict[str, tuple[Callable, Callable | None]]:
    """``name -> (forward, forward + backward)``: each maps one minibatch's inputs ``m`` to a scalar."""
    enc, dec, lik = params["encoder"], params["decoder"], config.gene_likelihood
    theta = jnp.exp(params["px_r"])

    def encoder_mm(w, m):
        s = _dense(w["hidden"]["dense_0"], m["lx"]).sum() + _dense(w["hidden"]["dense_1"], m["enc_in1"]).sum()
        return s + _dense(w["mean"], m["enc_h"]).sum() + _dense(w["log_var"], m["enc_h"]).sum()

    def decoder_mm(w, m):
        s = _dense(w["hidden"]["dense_0"], m["z"]).sum() + _dense(w["hidden"]["dense_1"], m["dec_in1"]).sum()
        return s + _dense(w["native_frequencies"], m["dec_h"]).sum() + _dense(w["noise_ratio"], m["dec_h"]).sum()

    def activations(a, m):
        relus = sum(jax.nn.relu(a[f"{s}_bn{i}"]).sum() for s in ("enc", "dec") for i in range(2))
        phi = row_normalize(softplus_sp(a["v"], config.sparsity))
        return m["lx"].sum() + relus + jnp.exp(a["log_var"]).sum() + phi.sum() + tanh01(a["u"]).sum()

    def mixture(a, m):
        return mixture_probs(a["phi"], a["eps"], ambient).sum()

    def kernel(a, m):
        law = make_likelihood(lik, a["probs"], m["library"], a["theta"], None)
        return log_prob_kernel(law, m["x"]).sum()

    def constant(a, m):
        if lik == "b":
            return log_binomial_coefficient(jnp.round(m["library"]), m["x"]).sum()
        return -jax.scipy.special.gammaln(m["x"] + 1.0).sum()

    def kl(a, m):
        return kl_local(Outputs(a["z_mean"], a["z_var"], *(None,) * 5)).sum()

    def batchnorm(a, m):
        sides = (("enc", enc), ("dec", dec))
        return sum(
            _batchnorm(n["hidden"][f"batchnorm_{i}"], a[f"{s}_pre{i}"]).sum() for s, n in sides for i in range(2)
        )

    acts = lambda m: {k: m[k] for k in ("enc_bn0", "enc_bn1", "dec_bn0", "dec_bn1", "log_var", "v", "u")}  # noqa: E731
    pres = lambda m: {k: m[k] for k in ("enc_pre0", "enc_pre1", "dec_pre0", "dec_pre1")}  # noqa: E731
    with_grad = {
        "encoder matmuls": (encoder_mm, lambda m: enc),
        "decoder matmuls": (decoder_mm, lambda m: dec),
        "activation/normalisation": (activations, acts),
        "mixture": (mixture, lambda m: {"phi": m["phi"], "eps": m["eps"]}),
        "likelihood kernel": (kernel, lambda m: {"probs": m["probs"], "theta": theta}),
        "likelihood c(x)": (constant, None),
        "KL": (kl, lambda m: {"z_mean": m["z_mean"], "z_var": m["z_var"]}),
        "BatchNorm": (batchnorm, pres),
    }
    parts = {"densify minibatch": (lambda m: counts.take(m["rows"]).sum(), None)}
    for name, (f, wrt) in with_grad.items():
        parts[name] = (_forward_of(f, wrt), None if wrt is None else _both_of(f, wrt))
    return parts


def _forward_of(f: Callable, wrt: Callable | None) -> Callable:
    return lambda m: f(None if wrt is None else wrt(m), m)


def _both_of(f: Callable, wrt: Callable) -> Callable:
    return lambda m: _grad_sum(f, wrt(m), m)


def _grad_sum(f: Callable, w: Tree, m: Tree) -> jax.Array:
    value, grads = jax.value_and_grad(f)(w, m)
    return value + sum(g.sum() for g in jax.tree.leaves(grads))


def scanned(fn: Callable) -> Callable:
    """``jit`` of ``fn`` over a stack of minibatch inputs (one ``lax.scan``), summing the scalars."""

    @jax.jit
    def run(stacked):
        return jax.lax.scan(lambda c, m: (c + fn(m), None), jnp.float32(0.0), stacked)[0]

    return run


def best_times(functions: dict[str, Callable], args: dict[str, tuple], repeats: int) -> dict[str, float]:
    """Fastest wall time (s) of each function over ``repeats`` interleaved rounds (first call compiles)."""
    for name, f in functions.items():
        jax.block_until_ready(f(*args[name]))
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, f in functions.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args[name]))
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def cost(compiled) -> dict[str, float]:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
    return {k: float(analysis.get(k, 0.0)) for k in ("flops", "transcendentals", "bytes accessed")}


# long: one measurement run, its setup and its two tables; each block is a few lines
def profile(n_cells: int, n_genes: int, lik: str, batch_size: int, n_steps: int, repeats: int, seed: int) -> None:
    adata = simulate(n_cells=n_cells, n_genes=n_genes, seed=seed)
    x = adata.X.tocsr()
    library = np.asarray(x.sum(1), np.float32).reshape(-1, 1)
    profile_ = np.asarray(adata.varm["true_ambient_profile"], np.float64).ravel()
    ambient = jnp.asarray((profile_ / profile_.sum())[None, :], jnp.float32)
    config = SCARConfig(n_genes=n_genes, gene_likelihood=lik)
    net = config.make_net()
    variables = init_variables(net, jax.random.key(seed), n_genes)
    params = variables["params"]
    counts = to_device(x)
    constants = jnp.asarray(cell_log_constants(lik, x, library).astype(np.float32))
    train_idx, val_idx, _ = split_indices(n_cells, 0.9, None, True, batch_size, seed)
    data_full = CellData(counts, jnp.asarray(library), jnp.zeros(n_cells, jnp.int32))
    data_diet = data_full._replace(log_constant=constants) if has_log_constant(lik) else data_full

    # per-part inputs: n_steps minibatches and their forward intermediates
    rng = np.random.default_rng(seed)
    rows = jnp.asarray(rng.permutation(train_idx)[: n_steps * batch_size].reshape(n_steps, batch_size), jnp.int32)
    noise = jax.random.normal(jax.random.key(seed + 1), (n_steps, batch_size, config.n_latent))
    xs = jax.vmap(counts.take)(rows)
    stacked = jax.vmap(lambda xb, nb: intermediates(params, xb, nb, config.sparsity))(xs, noise)
    stacked.update(x=xs, rows=rows, library=jnp.asarray(library)[rows])
    stacked["probs"] = mixture_probs(stacked["phi"], stacked["eps"], ambient[None])
    parts = part_functions(config, params, counts, ambient)
    functions, args = {}, {}
    for name, (fwd, both) in parts.items():
        functions[f"{name}|fwd"], args[f"{name}|fwd"] = scanned(fwd), (stacked,)
        if both is not None:
            functions[f"{name}|both"], args[f"{name}|both"] = scanned(both), (stacked,)

    # whole forward, forward + backward, optimizer, epoch, validation: before (c per entry) and after (diet)
    tx = make_optimizer()
    key = jax.random.key(seed + 2)
    train_rows, val_rows = jnp.asarray(train_idx, jnp.int32), jnp.asarray(val_idx, jnp.int32)
    for tag, data in (("before", data_full), ("after", data_diet)):

        def loss(p, m, data=data):
            batch = data.batch(m["rows"])
            v = {"params": p, "batch_stats": variables["batch_stats"]}
            return loss_terms(net, config, v, batch, ambient, key, 1.0, True)[0].loss

        functions[f"forward|{tag}"], args[f"forward|{tag}"] = scanned(lambda m, f=loss: f(params, m)), (stacked,)
        both = lambda m, f=loss: _grad_sum(f, params, m)  # noqa: E731
        functions[f"fwd+bwd|{tag}"], args[f"fwd+bwd|{tag}"] = scanned(both), (stacked,)
        epoch = make_train_epoch(net, config, tx, batch_size)
        evaluate = make_evaluate(net, config, batch_size)

        def run_epoch(data=data, epoch=epoch):
            state = init_train_state(jax.tree.map(jnp.copy, variables), tx, jax.random.key(seed + 3))
            return epoch(state, data, train_rows, ambient, jnp.float32(0.5))[1].loss

        functions[f"epoch|{tag}"], args[f"epoch|{tag}"] = run_epoch, ()
        functions[f"validation|{tag}"] = lambda data=data, ev=evaluate: (
            ev(variables, data, val_rows, ambient, jnp.float32(1.0), key).loss
        )
        args[f"validation|{tag}"] = ()
        lowered_batch = data.batch(rows[0])
        step_cost = cost(
            jax.jit(lambda p, b: jax.value_and_grad(lambda q: _loss_of(net, config, variables, q, b, ambient, key))(p))
            .lower(params, lowered_batch)
            .compile()
        )
        print(
            f"  compiled loss+gradient of one minibatch ({tag}): "
            + ", ".join(f"{k} {v:.3g}" for k, v in step_cost.items())
        )

    def update(m):  # gradients that depend on the minibatch, so that XLA cannot hoist the update out of the loop
        grads = jax.tree.map(lambda p: p * m["eps"][0, 0], params)
        updates, _ = tx.update(grads, opt_state, params)
        return sum(u.sum() for u in jax.tree.leaves(updates))

    opt_state = tx.init(params)
    functions["optimizer update|fwd"], args["optimizer update|fwd"] = scanned(update), (stacked,)

    times = best_times(functions, args, repeats)
    n_train_steps = -(-len(train_idx) // batch_size)
    per_step = {k: 1e3 * v / n_steps for k, v in times.items() if k.split("|")[0] not in ("epoch", "validation")}
    for tag in ("before", "after"):
        per_step[f"epoch|{tag}"] = 1e3 * times[f"epoch|{tag}"] / n_train_steps
        per_step[f"validation|{tag}"] = 1e3 * times[f"validation|{tag}"] / n_train_steps
    _print_table(per_step, lik, n_cells, n_genes, batch_size, n_train_steps)


def _loss_of(net, config, variables, params, batch, ambient, key):
    v = {"params": params, "batch_stats": variables["batch_stats"]}
    return loss_terms(net, config, v, batch, ambient, key, 1.0, True)[0].loss


def _print_table(ms: dict[str, float], lik: str, n_cells: int, n_genes: int, batch_size: int, steps: int) -> None:
    names = [
        "densify minibatch",
        "encoder matmuls",
        "decoder matmuls",
        "activation/normalisation",
        "mixture",
        "likelihood kernel",
        "likelihood c(x)",
        "KL",
        "BatchNorm",
    ]
    print(f"\n{n_cells} x {n_genes}, {lik}, batch {batch_size}, {steps} steps per epoch; ms per training step")
    header = f"{'part':<34} {'before ms':>9} {'share':>6} {'after ms':>9} {'share':>6} {'fwd+bwd ms':>10}"
    print(header)
    print("-" * len(header))
    total = {t: ms[f"epoch|{t}"] + ms[f"validation|{t}"] for t in ("before", "after")}
    c_in_step = lik == "b" or lik == "poisson"  # the parts the step evaluates before / after the diet
    listed = {"before": 0.0, "after": 0.0}

    def row(label: str, before: float, after: float, both: float | None = None) -> None:
        listed["before"] += before
        listed["after"] += after
        b = f"{both:>10.3f}" if both is not None else f"{'':>10}"
        print(
            f"{label:<34} {before:>9.3f} {before / total['before']:>6.1%} {after:>9.3f} "
            f"{after / total['after']:>6.1%} {b}"
        )

    for name in names:
        fwd, both = ms[f"{name}|fwd"], ms.get(f"{name}|both")
        if name == "likelihood c(x)":
            label = "likelihood c(x) (betaln)" if lik == "b" else "likelihood c(x) (lgamma(x+1))"
            if not c_in_step:
                label += " [not in step]"
            row(label, fwd if c_in_step else 0.0, 0.0, None)
            continue
        row(name, fwd, fwd, both)
    backward = {t: ms[f"fwd+bwd|{t}"] - ms[f"forward|{t}"] for t in ("before", "after")}
    row("backward (fwd+bwd - fwd, measured)", backward["before"], backward["after"])
    row("optimizer update", ms["optimizer update|fwd"], ms["optimizer update|fwd"])
    row("validation (per training step)", ms["validation|before"], ms["validation|after"])
    row(
        "other (step - listed; < 0: fusion)",
        total["before"] - listed["before"],
        total["after"] - listed["after"],
    )
    print("-" * len(header))
    for t in ("before", "after"):
        print(
            f"{t}: forward {ms[f'forward|{t}']:.3f} ms, forward+backward {ms[f'fwd+bwd|{t}']:.3f} ms, "
            f"whole step {ms[f'epoch|{t}']:.3f} ms (epoch / steps), + validation {ms[f'validation|{t}']:.3f} ms "
            f"= {total[t]:.3f} ms per step"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="10000x2000")
    parser.add_argument("--likelihoods", nargs="+", default=["b", "nb"], choices=["b", "poisson", "nb"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16, help="minibatches each part is timed on")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_cells, n_genes = (int(v) for v in args.size.lower().split("x"))
    device = jax.devices()[0]
    print(
        f"scar-jax {__version__}, jax {jax.__version__}, {device.platform}:{device.device_kind}, "
        f"{platform.processor() or platform.machine()}; float32; best of {args.repeats} interleaved repeats"
    )
    for lik in args.likelihoods:
        profile(n_cells, n_genes, lik, args.batch_size, args.steps, args.repeats, args.seed)


if __name__ == "__main__":
    main()
