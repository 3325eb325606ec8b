"""sigma-moe: σ-MoE and the paper's feedforward family, from one CPU to many GPUs.

The subpackages live in the repository's top-level folders (see pyproject.toml):
``sigma_moe.kernels`` (CVMM), ``sigma_moe.layers`` (model math), ``sigma_moe.distributed``
(expert parallelism) and ``sigma_moe.launch`` (configs, data, engine, CLI).
"""

__version__ = "0.1.0"
