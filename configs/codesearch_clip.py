r"""Code search: a CLIP-style dual encoder matching Python docstrings to function source.

The main job of the README. Data: (docstring, function source) pairs extracted with ``ast`` from the
running interpreter's standard library (docstring removed from the code), 4,374 train / 468 held-out
pairs on CPython 3.11, read as hashed identifier sub-tokens (camelCase / snake_case split, lower
case) and their 4-letter prefixes (``jaxbatch.data.subtokens``). Model: a shared (Siamese) bag of
sub-token embeddings with a learned salience per hash bucket (``SubtokenBagEncoder``), the CLIP
softmax contrastive loss over the whole batch of 1,024, LAMB, and a model EMA. Run (about two
minutes on a 2-core CPU, compile included):

  jaxbatch train --config configs/codesearch_clip.py --workdir runs/codesearch_clip

Expected: held-out recall@1 ≈ 0.63 and recall@10 ≈ 0.89 (model and EMA), above the lexical TF-IDF
baseline on the same split (0.50 / 0.80), which the run prints next to it (README "Results" holds
the numbers of that command; docs/main_job.md what each choice is worth).

Variants: ``get_config('ngram')`` the byte n-gram tower this job used before (0.56 / 0.86 at batch
512), ``get_config('siglip')`` the SigLIP sigmoid loss (with a learned bias),
``get_config('transformer')`` byte-level transformer towers, ``get_config('runlocal')`` a
seconds-long run for tests. Changing ``--config.batch_size`` moves the LAMB learning rate by the
sqrt rule and the EMA decay by ρ^κ from the reference batch of 512.
"""

import math

from jaxbatch.train.config import default_config

TRAIN_PAIRS = 4374  # CPython 3.11.7; only used to state the length of training in epochs


def get_config(arg: str | None = None):
    c = default_config()
    c.task = "contrastive"
    c.seed = 0
    c.dataset.name = "codesearch"
    c.dataset.options.tokenizer = "subtokens+prefixes"
    c.dataset.options.doc_len = 64
    c.dataset.options.code_len = 256

    c.model.name = "dual_encoder"
    c.model.embed_dim = 256
    c.model.share_towers = True
    c.model.x_encoder = dict(name="subtoken_bag", width=256, buckets=2**16, token_dropout=0.3)
    c.model.logit_scale_init = math.log(1 / 0.07)

    c.loss.kind = "softmax"
    c.loss.implementation = "auto"

    c.batch_size = 1024
    c.reference_batch_size = 512
    c.total_samples = TRAIN_PAIRS * 10

    c.optimizer.name = "lamb"
    c.optimizer.learning_rate = 0.01
    c.optimizer.weight_decay = 0.1
    c.optimizer.eps = 1e-6
    c.scaling.learning_rate = "sqrt"
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_samples = TRAIN_PAIRS
    c.ema.decay = 0.9

    c.eval_batch_size = 512
    c.log_every_steps = 5
    c.eval_every_steps = 20
    c.checkpoint_every_steps = 0  # only at the end

    if arg == "ngram":  # the byte n-gram tower this job used before (docs/main_job.md)
        c.dataset.options.tokenizer = "bytes"
        c.dataset.options.doc_len = 256
        c.dataset.options.code_len = 1024
        c.model.x_encoder = dict(
            name="ngram_bag", width=256, buckets=32768, orders=(3, 4, 5), ngram_dropout=0.3
        )
    elif arg == "siglip":
        c.loss.kind = "sigmoid"
        c.model.logit_scale_init = math.log(10.0)
        c.model.logit_bias_init = -10.0
    elif arg == "transformer":
        c.dataset.options.tokenizer = "bytes"
        c.model.share_towers = False
        c.dataset.options.code_len = 256
        c.dataset.options.doc_len = 128
        tower = dict(name="text_encoder", width=128, depth=2, heads=4, mlp_dim=256, pool="cls")
        c.model.x_encoder = dict(tower, max_len=128)
        c.model.y_encoder = dict(tower, max_len=256)
    elif arg == "runlocal":
        c.dataset.options.doc_len = 64
        c.dataset.options.code_len = 128
        c.model.embed_dim = 32
        # No token dropout: the tests compare micro-batched and full-batch runs exactly.
        c.model.x_encoder = dict(name="subtoken_bag", width=32, buckets=1024)
        c.batch_size = 64
        c.reference_batch_size = 64
        c.total_samples = 64 * 4
        c.schedule.warmup_samples = 64
        c.eval_batch_size = 512
        c.eval_every_steps = 0
        c.checkpoint_every_steps = 0
        c.log_every_steps = 2
    return c
