r"""CIFAR-style ResNet-8 on the bundled digits (8×8) with LARS at batch 1,024.

Run (about a minute on a 2-core CPU):

  jaxbatch train --config configs/digits_resnet_lars.py --workdir runs/digits_lars

Expected: test accuracy ≈ 0.96 after 56 steps (README "Results" holds the number of that command).
Change the batch with ``--config.batch_size=256``: the learning rate follows the linear rule from
``reference_batch_size`` and warm-up stays at the same number of samples.

``get_config('runlocal')`` is a seconds-long variant for tests.
"""

from jaxbatch.train.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.task = "classification"
    c.seed = 0
    c.dataset.name = "digits"

    c.model.name = "resnet_cifar"
    c.model.stage_sizes = (1, 1, 1)
    c.model.num_filters = 16
    c.model.num_classes = 10
    c.model.norm = "batch"
    # A short run (56 steps at batch 1,024) with a large learning rate: the weights move a lot per
    # step, so the running statistics must forget fast or they trail the weights at eval time.
    c.model.bn_momentum = 0.5

    c.batch_size = 1024
    c.reference_batch_size = 256
    c.total_samples = 1437 * 40  # 40 epochs of the 1,437 training images

    c.optimizer.name = "lars"
    c.optimizer.learning_rate = 0.8  # at batch 256; linear rule → 3.2 at 1,024
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.trust_coefficient = 0.02
    c.scaling.learning_rate = "linear"

    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_samples = 1437 * 5

    # No model EMA: in a 56-step run at a large learning rate an average over the trajectory mixes
    # very different weights (and batch statistics); scripts/demo_scaling.py studies the EMA rule.
    c.ema.decay = 0.0
    c.eval_batch_size = 360
    c.log_every_steps = 5
    c.eval_every_steps = 20

    if arg == "runlocal":
        c.batch_size = 256
        c.total_samples = 256 * 6
        c.schedule.warmup_samples = 256
        c.eval_every_steps = 0
        c.log_every_steps = 2
    return c
