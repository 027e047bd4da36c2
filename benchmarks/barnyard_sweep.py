# ruff: noqa: E402, E501, E702  (an experiment script kept as run; tidy it when it becomes a benchmark table)
"""Barnyard regime (issue 19): the calibrated denoising over neighbourhood size, knob and ambient-profile variant.

Usage: ``python benchmarks/barnyard_sweep.py SEED [--latent-only]`` (trains one SCAR at default settings on
:func:`scar_jax.datasets.simulate_barnyard` with the Good-Turing posterior profile estimated from
:func:`scar_jax.datasets.barnyard_raw_droplets`, then calibrates with the reference profile with zeros (p0), the
posterior with the unseen mass spread as the droplets\x27 pooled profile (gt_m, the default) or uniformly (gt_uni)).
Prints foreign counts removed, expressed-gene counts kept, removal on the genes the cell-free droplets missed and
the per-species calibrated noise ratio / truth and Pearson r.
"""
import os
import sys
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")
from scar_jax import SCAR
from scar_jax.ambient import estimate_ambient_profile, posterior_profile
from scar_jax.calibration import (
    START_NOISE_RATIO,
    calibrated_native_share,
    calibrated_split,
    count_checked_neighbours,
    knn_indices,
)
from scar_jax.datasets import barnyard_raw_droplets, simulate_barnyard
from scar_jax.metrics import pearson, species_mixture_metrics

seed = int(sys.argv[1])
latent_only = '--latent-only' in sys.argv  # the neighbours before the count check (the first table)
a = simulate_barnyard(seed=seed)
raw = barnyard_raw_droplets(a, seed=seed + 1)
SCAR.setup_anndata(a)
est0 = estimate_ambient_profile(raw.X, prior_counts=0)
est = estimate_ambient_profile(raw.X)
zero = est0.profile == 0
c = np.asarray(raw.X[est.droplets][est.cell_free].sum(0)).ravel().astype(float)
seen_any = np.asarray(raw.X.sum(0)).ravel() > 0
uni, _ = posterior_profile(c, seen_any.astype(float))
profiles = {"p0": est0.profile, "gt_m": est.profile, "gt_uni": uni}
X = a.X
print("zero genes", zero.mean(), "cells' counts there", X[:, zero].sum() / X.sum(), "alpha0", est.prior_counts, "unseen mass", est.profile[zero].sum(), "true", a.varm["true_ambient_profile"][zero, 0].sum(), "true ambient share there", a.layers["ambient"][:, zero].sum() / X[:, zero].sum(), flush=True)
cache = f"barnyard_latent_{seed}.npy"
if os.path.exists(cache):
    latent = np.load(cache)
else:
    t = time.time()
    model = SCAR(a, ambient_profile=est.profile[:, None], seed=seed)
    model.train(enable_progress_bar=False)
    print("train", time.time() - t, flush=True)
    latent = model.get_latent_representation(); np.save(cache, latent)
truth = a.obs.noise_ratio.to_numpy(); spc = a.obs.species.cat.codes.to_numpy()
for nn in (10, 15, 22, 30, 40, 50):
    nb = knn_indices(latent, nn) if latent_only else count_checked_neighbours(latent, X, nn)
    print(f"nn {nn} same-species {(spc[nb] == spc[:, None]).mean():.3f}")
    for pname, prof in profiles.items():
        for odds in (0.03, 0.1, 0.3):
            eps, share = calibrated_native_share(X, nb, prof, np.full(a.n_obs, START_NOISE_RATIO), expressed_prior_odds=odds, share_at="observed")
            den = calibrated_split(X, share, seed)
            mm = species_mixture_metrics(a, den)
            zr = 1 - den[:, zero].sum() / X[:, zero].sum()
            sps = " ".join(f"s{s} {eps[spc==s].mean()/truth[spc==s].mean():.2f}/{pearson(eps[spc==s], truth[spc==s]):.2f}" for s in (0, 1))
            print(f"  {pname:6s} odds {odds:5}: kept {mm['expressed_kept']:.4%} foreign rm {mm['foreign_removed']:.2%} zero-genes rm {zr:.3%} eps {sps}", flush=True)
