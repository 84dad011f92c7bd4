r"""ResNet-50 on ImageNet (ILSVRC-2012) with LARS at batch 32,768: the MLPerf large-batch setup.

Plan it on this machine (compile-only, 256 simulated devices, a few minutes on a 2-core CPU):

  jaxbatch plan --config configs/imagenet_resnet50_lars.py --devices 256

Train on a TPU pod / GPU cluster with a prepared TFDS ``imagenet2012`` (ArrayRecord format, on a
local disk or a gcsfuse mount), or with shards from ``scripts/prepare_image_folder.py`` and
``--config.dataset.options.format=array_record`` (see BUILD.md "Scale-out"):

  scripts/launch_tpu_pod.sh ... jaxbatch train --config configs/imagenet_resnet50_lars.py \
      --config.dataset.options.data_dir=/mnt/tfds --workdir gs://BUCKET/runs/r50_32k

Expected: ≥ 75.9 % top-1 on the 50,000 validation images (the MLPerf quality target) after about
40 epochs (~1,600 steps), as LARS reaches at this batch in MLPerf; not run by jaxbatch (no pod).

Hyper-parameters (stated at the reference batch 32,768; ``--config.batch_size`` rescales the
learning rate linearly, warm-up stays at the same number of samples): LARS with base learning rate
27.5, trust coefficient 0.001, momentum 0.9321, weight decay 1e-4 (no decay or trust ratio on
biases and batch-norm parameters), ε = 0, 16 warm-up epochs, label smoothing 0.1, as in Google's
MLPerf v0.7 TPU submission at this batch (``lars_base_learning_rate=27.5``,
``lars_warmup_epochs=16``); MLPerf decays polynomially (power 2), jaxbatch uses the cosine decay
closest to it. bf16 compute with float32 parameters; batch-norm momentum 0.9, zero-initialised last
norm of each residual branch (Goyal et al. 2017).

References: You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks" (LARS,
ResNet-50 at 32K); Goyal et al. 2017, "Accurate, Large Minibatch SGD" (warm-up, zero-γ).

``get_config('runlocal')`` is a tiny variant (32×32 images, 2 stages of blocks) used by the tests
to build, plan and train it on 8 CPU devices.
"""

from jaxbatch.train.config import default_config

IMAGENET_TRAIN = 1_281_167
IMAGENET_VALIDATION = 50_000


def get_config(arg: str | None = None):
    c = default_config()
    c.task = "classification"
    c.seed = 0

    # ImageNet from TFDS (`tfds build imagenet2012 --file_format=array_record`); examples are
    # decoded, random-resized-cropped to image_size and normalised (BUILD.md "Scale-out").
    c.dataset.name = "imagenet2012"
    c.dataset.options.image_size = 224
    c.dataset.options.data_dir = ""  # set on the command line: the TFDS data_dir
    c.dataset.transform_threads = 16  # JPEG decode + crop of a batch; Pillow releases the GIL
    c.dataset.options.format = "tfds"  # or 'array_record' (scripts/prepare_image_folder.py)
    c.dataset.options.min_crop_area = 0.08  # Inception crop: 8 %-100 % of the image

    c.model.name = "resnet50"
    c.model.num_classes = 1000
    c.model.norm = "batch"
    c.model.zero_init_residual = True
    c.model.bn_momentum = 0.9
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"

    c.batch_size = 32768
    c.reference_batch_size = 32768
    c.total_samples = 2355 * 32768  # MLPerf step budget (~60 epochs); the target is hit earlier
    c.scaling.learning_rate = "linear"

    c.optimizer.name = "lars"
    c.optimizer.learning_rate = 27.5
    c.optimizer.momentum = 0.9321
    c.optimizer.weight_decay = 1e-4
    c.optimizer.trust_coefficient = 0.001
    c.optimizer.eps = 0.0
    c.optimizer.mask = "exclude_bias_and_norm"

    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_samples = 16 * IMAGENET_TRAIN
    c.schedule.end_lr_fraction = 0.0

    c.loss.label_smoothing = 0.1
    c.eval_batch_size = 8192
    c.log_every_steps = 20
    c.eval_every_steps = 157  # every ~4 epochs, as MLPerf evaluates
    c.checkpoint_every_steps = 157

    # Pure data parallelism: ResNet-50's 25.6M parameters (102 MB in f32) fit every device, so
    # sharding them along fsdp would only add all-gathers. `--config.mesh.fsdp=8` shards them.
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    if arg == "runlocal":
        c.dataset.options.image_size = 32
        c.model.name = "resnet_cifar"
        c.model.stage_sizes = (1, 1)
        c.model.num_filters = 8
        c.model.num_classes = 16
        c.model.dtype = "float32"
        c.batch_size = c.reference_batch_size = 64
        c.total_samples = 64 * 4
        c.schedule.warmup_samples = 64
        c.eval_batch_size = 64
        c.eval_every_steps = c.checkpoint_every_steps = 0
    elif arg not in (None, ""):
        raise ValueError(f"imagenet_resnet50_lars: unknown variant {arg!r}; expected 'runlocal'")
    return c
