r"""SigLIP: ViT-B/16 image tower + text transformer, sigmoid loss, batch 32,768.

Plan it on this machine (compile-only, 256 simulated devices):

  jaxbatch plan --config configs/siglip_pod.py --devices 256

Train on a pod with image-text pairs written as ArrayRecord shards by
``scripts/prepare_image_text.py`` (captions pre-tokenised to 'tokens'; see BUILD.md "Scale-out"):

  jaxbatch train --config configs/siglip_pod.py --config.dataset.options.data_dir=/data/pairs \
      --workdir gs://BUCKET/runs/siglip_b16

Expected (Zhai et al. 2023, Table 3/Figure 2): about 73 % zero-shot ImageNet top-1 for SigLIP
ViT-B/16 after 9B WebLI examples at batch 32K; not run by jaxbatch (no pod, no WebLI).

Loss: ``contrastive_loss(kind='sigmoid', implementation='auto')``:
−Σ_ij log σ(z_ij·(t·x_i·y_j + b)) / N with z = +1 on the diagonal, −1 elsewhere; the 'auto'
implementation never materialises the N×N logits. Initialisation t' = log 10 (t = e^t'), b = −10
(SigLIP, Algorithm 1). Optimizer as in the paper: Adam(W) with lr 1e-3, β2 = 0.95, weight decay
1e-4, cosine decay after a linear warm-up; bf16 compute, float32 parameters. Images 224×224 (196
patches), text 64 tokens of a 32,000-piece vocabulary (pad id 0), last-token pooling.

References: Zhai, Mustafa, Kolesnikov, Beyer 2023, "Sigmoid Loss for Language Image Pre-Training";
Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words" (ViT-B/16).

``get_config('runlocal')`` is a tiny two-tower model used by the tests to build, plan and train it
on 8 CPU devices (captions as byte tokens, vocabulary 258).
"""

import math

from jaxbatch.train.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.task = "contrastive"
    c.seed = 0

    # Image-text pairs in ArrayRecord shards (jaxbatch.data.image_text, scripts/
    # prepare_image_text.py); captions stored as 'tokens' of a 32K SentencePiece vocabulary.
    c.dataset.name = "image_text"
    c.dataset.pair_fields = ("image", "text")
    c.dataset.options.image_size = 224
    c.dataset.options.text_len = 64
    c.dataset.options.data_dir = ""  # set on the command line
    c.dataset.transform_threads = 16  # JPEG decode + crop of a batch; Pillow releases the GIL

    c.model.name = "dual_encoder"
    c.model.embed_dim = 768
    c.model.logit_scale_init = math.log(10.0)
    c.model.logit_bias_init = -10.0
    c.model.dtype = "bfloat16"
    c.model.x_encoder = dict(
        name="vit",
        patch_size=16,
        hidden=768,
        depth=12,
        heads=12,
        mlp_dim=3072,
        num_classes=None,
        pool="gap",
        dtype="bfloat16",
    )
    c.model.y_encoder = dict(
        name="text_encoder",
        vocab_size=32000,
        width=768,
        depth=12,
        heads=12,
        mlp_dim=3072,
        max_len=64,
        pool="last",
        pad_id=0,
        dtype="bfloat16",
    )

    c.batch_size = 32768
    c.reference_batch_size = 32768
    c.total_samples = 9_000_000_000
    c.scaling.learning_rate = "sqrt"

    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 1e-4
    c.optimizer.mask = "exclude_bias_and_norm"

    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_samples = 5000 * 32768
    c.schedule.end_lr_fraction = 0.0

    c.loss.kind = "sigmoid"
    c.loss.implementation = "auto"

    c.eval_batch_size = 8192
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000

    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    if arg == "runlocal":
        c.dataset.options.image_size = 16
        c.dataset.options.text_len = 8
        c.model.embed_dim = 16
        c.model.dtype = "float32"
        c.model.x_encoder = dict(
            name="vit", patch_size=8, hidden=16, depth=1, heads=2, mlp_dim=32, num_classes=None
        )
        c.model.y_encoder = dict(
            name="text_encoder",
            vocab_size=258,  # jaxbatch.data.tokens.VOCAB_SIZE: captions stored as 'text' bytes
            width=16,
            depth=1,
            heads=2,
            mlp_dim=32,
            max_len=8,
            pool="last",
        )
        c.batch_size = c.reference_batch_size = 64
        c.total_samples = 64 * 4
        c.schedule.warmup_samples = 64
        c.eval_batch_size = 64
    elif arg not in (None, ""):
        raise ValueError(f"siglip_pod: unknown variant {arg!r}; expected 'runlocal'")
    return c
