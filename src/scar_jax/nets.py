"""The SCAR networks: encoder, decoder and activations (the only ``flax.linen`` file).

Architecture of ``scvi.external.SCAR`` (scvi-tools 1.4), layer for layer:

* encoder: ``log1p(x)`` -> ``n_layers`` x [Dense(n_hidden) -> BatchNorm -> ReLU -> Dropout] ->
  ``mean`` = Dense(n_latent), ``var`` = exp(Dense(n_latent)) + 1e-4;
* decoder: ``n_layers`` x [Dense(n_hidden) -> BatchNorm -> ReLU] from z (or softmax(z) for the
  logistic-normal latent) -> three heads: native frequencies (Dense(n_genes) -> scale activation ->
  row normalisation), noise ratio (Dense(1) -> (1 + tanh) / 2), zero-inflation logits (Dense(n_genes)).

BatchNorm uses epsilon 1e-3 and PyTorch momentum 0.01, i.e. ``momentum=0.99`` in Flax's convention.
One difference with PyTorch that only touches the *running* statistics: Flax stores the biased batch
variance, PyTorch the unbiased one (a factor B / (B - 1), 1.008 at B = 128). Forward passes with the
same running statistics are identical.

Dense layers are initialised as ``torch.nn.Linear`` is (kaiming-uniform with a = sqrt(5), i.e.
U(+-1/sqrt(fan_in)) for kernels and biases), so training from scratch starts where scvi-tools does.
Layer names are fixed (``hidden_0`` ...), the contract for weight import and saving.

Matmul precision (``matmul_precision``, beyond scvi-tools): ``"float32"`` (default) computes every Dense
layer in true float32 on every backend (JAX's own default on NVIDIA GPUs since Ampere is TF32);
``"tensorfloat32"`` and ``"bfloat16"`` round the layer inputs and kernels to TF32 / bfloat16 and
accumulate in float32 (JAX dot algorithms ``TF32_TF32_F32`` / ``BF16_BF16_F32``) on GPUs; activations,
BatchNorm, parameters and every likelihood stay float32. XLA's CPU backend ignores a dot's precision on float32
operands, so there ``"bfloat16"`` casts the operands to bfloat16 and asks for a float32 result
(``preferred_element_type``; the same arithmetic: bfloat16 products, float32 accumulation), which runs on the
CPU's bfloat16 units where it has them; the CPU has no TF32, so ``"tensorfloat32"`` computes float32 there.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

ScaleActivation = Literal["softplus_sp", "softplus", "softmax"]
MatmulPrecision = Literal["float32", "tensorfloat32", "bfloat16"]
MATMUL_PRECISIONS = ("float32", "tensorfloat32", "bfloat16")
LatentDistribution = Literal["normal", "ln"]

VAR_EPS = 1e-4
ROWNORM_EPS = 1e-5
BATCHNORM_EPS = 1e-3
BATCHNORM_MOMENTUM = 0.99  # Flax convention; = PyTorch momentum 0.01


def torch_linear_kernel_init() -> nn.initializers.Initializer:
    """``torch.nn.Linear`` weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """``torch.nn.Linear`` bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / jnp.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def softplus_sp(x: jax.Array, sparsity: float) -> jax.Array:
    """Sparse softplus of scAR: ``max(0, softplus(x) - softplus(-10 (1 - sparsity)))``.

    At ``sparsity=0.9`` the threshold is softplus(-1) = 0.3133, so ``softplus_sp(0.01) = 0.3849``.
    """
    threshold = jax.nn.softplus(-10.0 * (1.0 - sparsity))
    return jax.nn.relu(jax.nn.softplus(x) - threshold)


def tanh01(x: jax.Array) -> jax.Array:
    """Noise-ratio activation ``(1 + tanh(x)) / 2`` in [0, 1]; ``tanh01(1) = 0.8808``."""
    return (1.0 + jnp.tanh(x)) / 2.0


def row_normalize(x: jax.Array) -> jax.Array:
    """``x / (sum_g x + 1e-5)`` over the last axis (rows sum to slightly below 1)."""
    return x / (jnp.sum(x, axis=-1, keepdims=True) + ROWNORM_EPS)


def scale_activation_fn(v: jax.Array, kind: ScaleActivation, sparsity: float) -> jax.Array:
    """Apply the decoder's scale activation ``kind`` to the pre-activations ``v``."""
    match kind:
        case "softplus_sp":
            return softplus_sp(v, sparsity)
        case "softplus":
            return jax.nn.softplus(v)
        case "softmax":
            return jax.nn.softmax(v, axis=-1)
    raise ValueError(f"scale_activation must be 'softplus_sp', 'softplus' or 'softmax', got {kind!r}")


def dot_precision(matmul_precision: MatmulPrecision) -> jax.lax.Precision | str:
    """The ``precision`` of the Dense layers' dot products for a ``matmul_precision`` name (module docstring)."""
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {matmul_precision!r}")
    if matmul_precision == "float32" or jax.default_backend() != "gpu":
        return jax.lax.Precision.HIGHEST
    return "TF32_TF32_F32" if matmul_precision == "tensorfloat32" else "BF16_BF16_F32"


def bfloat16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None) -> jax.Array:
    """``lax.dot_general`` of the operands rounded to bfloat16, accumulated and returned in float32 (the CPU's
    ``"bfloat16"`` matmul, module docstring); ``precision`` and ``preferred_element_type`` are ignored."""
    del precision, preferred_element_type
    return jax.lax.dot_general(
        lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), dimension_numbers, preferred_element_type=jnp.float32
    )


def _dense(features: int, fan_in: int, name: str, matmul_precision: MatmulPrecision = "float32") -> nn.Dense:
    precision = dot_precision(matmul_precision)
    cast = matmul_precision == "bfloat16" and jax.default_backend() != "gpu"
    return nn.Dense(
        features,
        kernel_init=torch_linear_kernel_init(),
        bias_init=torch_linear_bias_init(fan_in),
        precision=None if cast else precision,
        dot_general=bfloat16_dot_general if cast else None,
        name=name,
    )


class HiddenStack(nn.Module):
    """``n_layers`` x [Dense(n_hidden) -> BatchNorm -> ReLU -> Dropout(dropout_rate)]."""

    n_hidden: int
    n_layers: int
    dropout_rate: float = 0.0
    matmul_precision: MatmulPrecision = "float32"

    @nn.compact
    def __call__(self, h: jax.Array, train: bool) -> jax.Array:
        for i in range(self.n_layers):
            h = _dense(self.n_hidden, h.shape[-1], f"dense_{i}", self.matmul_precision)(h)
            h = nn.BatchNorm(
                use_running_average=not train,
                momentum=BATCHNORM_MOMENTUM,
                epsilon=BATCHNORM_EPS,
                name=f"batchnorm_{i}",
            )(h)
            h = nn.relu(h)
            if self.dropout_rate > 0:
                h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
        return h


class Encoder(nn.Module):
    """q(z | x): returns the mean and variance, each ``(n_cells, n_latent)``."""

    n_latent: int
    n_hidden: int
    n_layers: int
    dropout_rate: float
    matmul_precision: MatmulPrecision = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        precision = self.matmul_precision
        h = HiddenStack(self.n_hidden, self.n_layers, self.dropout_rate, precision, name="hidden")(jnp.log1p(x), train)
        fan_in = h.shape[-1]
        z_mean = _dense(self.n_latent, fan_in, "mean", precision)(h)
        z_var = jnp.exp(_dense(self.n_latent, fan_in, "log_var", precision)(h)) + VAR_EPS
        return z_mean, z_var


class Decoder(nn.Module):
    """p(x | z) heads: native frequencies ``(n, G)``, noise ratio ``(n, 1)``, zero-inflation logits ``(n, G)``."""

    n_genes: int
    n_hidden: int
    n_layers: int
    scale_activation: ScaleActivation
    sparsity: float
    compute_zi_logits: bool = True
    matmul_precision: MatmulPrecision = "float32"

    @nn.compact
    def __call__(self, z: jax.Array, train: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        precision = self.matmul_precision
        h = HiddenStack(self.n_hidden, self.n_layers, 0.0, precision, name="hidden")(z, train)
        fan_in = h.shape[-1]
        v = _dense(self.n_genes, fan_in, "native_frequencies", precision)(h)
        native_frequencies = row_normalize(scale_activation_fn(v, self.scale_activation, self.sparsity))
        noise_ratio = tanh01(_dense(1, fan_in, "noise_ratio", precision)(h))
        zi_head = _dense(self.n_genes, fan_in, "zi_logits", precision)
        # The zero-inflation head exists in every model (as in scvi-tools) but is only evaluated for
        # 'zinb': elsewhere it would cost a third of the decoder's work for an unused output.
        if self.compute_zi_logits or self.is_initializing():
            zi_logits = zi_head(h)
        else:
            zi_logits = jnp.zeros_like(v)
        return native_frequencies, noise_ratio, zi_logits


class SCARNet(nn.Module):
    """Encoder + decoder + per-gene dispersion ``px_r`` (``theta = exp(px_r)``), as one linen module.

    ``__call__(x, z_noise, train)`` encodes, reparameterises z and decodes; the methods
    ``encode`` and ``decode`` are reachable through ``net.apply(..., method=...)``.
    """

    n_genes: int
    n_hidden: int = 150
    n_latent: int = 15
    n_layers: int = 2
    dropout_rate: float = 0.0
    latent_distribution: LatentDistribution = "normal"
    scale_activation: ScaleActivation = "softplus_sp"
    sparsity: float = 0.9
    compute_zi_logits: bool = True
    matmul_precision: MatmulPrecision = "float32"

    def setup(self) -> None:
        self.encoder = Encoder(self.n_latent, self.n_hidden, self.n_layers, self.dropout_rate, self.matmul_precision)
        self.decoder = Decoder(
            self.n_genes,
            self.n_hidden,
            self.n_layers,
            self.scale_activation,
            self.sparsity,
            self.compute_zi_logits,
            self.matmul_precision,
        )
        # scvi-tools: torch.randn(n_genes); kept (1, G) so it broadcasts without rank promotion.
        self.px_r = self.param("px_r", nn.initializers.normal(1.0), (1, self.n_genes))

    def encode(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        return self.encoder(x, train)

    def decode(self, z: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Decode a latent sample (before the logistic-normal softmax, which is applied here)."""
        z_in = jax.nn.softmax(z, axis=-1) if self.latent_distribution == "ln" else z
        return self.decoder(z_in, train)

    def dispersion(self) -> jax.Array:
        """``theta = exp(px_r)``, shape ``(1, n_genes)``."""
        return jnp.exp(self.px_r)

    def __call__(self, x: jax.Array, z_noise: jax.Array, train: bool = False):
        """Encode, reparameterise ``z = mean + sqrt(var) * z_noise`` (noise ``(n, n_latent)``), decode."""
        z_mean, z_var = self.encode(x, train)
        z = z_mean + jnp.sqrt(z_var) * z_noise
        native_frequencies, noise_ratio, zi_logits = self.decode(z, train)
        return z_mean, z_var, z, native_frequencies, noise_ratio, zi_logits, self.dispersion()
