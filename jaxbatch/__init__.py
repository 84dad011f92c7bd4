"""jaxbatch: large-batch training for JAX.

Sub-packages (import them explicitly, e.g. ``from jaxbatch import optim``):

- ``jaxbatch.optim``    Optax transforms: trust ratios, LARS, LAMB, model EMA, accumulation.
- ``jaxbatch.scaling``  hyper-parameters as a function of batch size.
- ``jaxbatch.stats``    gradient noise scale and critical-batch fits.
- ``jaxbatch.losses``   tiled contrastive loss, chunked linear cross-entropy.
- ``jaxbatch.nn``       Flax linen models.
- ``jaxbatch.parallel`` meshes, logical-axis rules, multi-host start.
- ``jaxbatch.data``     grain pipelines over bundled real data.
- ``jaxbatch.train``    the trainer and the ``jaxbatch`` CLI.
"""

__version__ = "0.1.0"
