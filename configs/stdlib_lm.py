r"""Byte-level decoder LM on the Python standard library's source, LAMB at batch 256.

Run (a few minutes on a 2-core CPU):

  jaxbatch train --config configs/stdlib_lm.py --workdir runs/stdlib_lm

Expected: held-out ≈ 3.0 bits per byte, against 8 for a uniform byte model (see README
"Results"; the number there comes from that command). ``get_config('adamw')`` swaps LAMB for AdamW
with the same schedule; ``get_config('runlocal')`` is a seconds-long variant for tests.

Long context: ``get_config('long')`` trains on 1,024-byte sequences (batch 8, 300 steps) with
``model.backprop='streambp'`` (exact sequence-chunked backprop, chunks of 128), and
``get_config('long_remat')`` is the same run with per-block remat; the two loss curves should
agree to float noise (the gradients are the same up to summation order):

  jaxbatch train --config configs/stdlib_lm.py:long --workdir runs/stdlib_lm_long
  jaxbatch train --config configs/stdlib_lm.py:long_remat --workdir runs/stdlib_lm_long_remat
"""

from jaxbatch.train.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.task = "lm"
    c.seed = 0
    c.dataset.name = "stdlib_text"
    c.dataset.options.seq_len = 64
    c.dataset.options.max_bytes = 4_000_000

    c.model.name = "decoder_lm"
    c.model.vocab_size = 258
    c.model.width = 128
    c.model.depth = 2
    c.model.heads = 4
    c.model.mlp_dim = 512
    c.model.max_len = 64
    c.model.scan_layers = True
    c.model.remat_policy = "none"

    c.batch_size = 256
    c.reference_batch_size = 256
    c.total_samples = 256 * 200

    c.optimizer.name = "lamb"
    c.optimizer.learning_rate = 1e-2
    c.optimizer.weight_decay = 0.01
    c.optimizer.b2 = 0.99
    c.optimizer.eps = 1e-6
    c.scaling.learning_rate = "sqrt"
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_samples = 256 * 20
    c.schedule.end_lr_fraction = 0.05

    c.eval_batch_size = 512
    c.log_every_steps = 10
    c.eval_every_steps = 50
    c.checkpoint_every_steps = 50

    if arg in ("long", "long_remat"):
        length = 1024
        c.dataset.options.seq_len = length
        c.model.max_len = length
        c.model.backprop = "streambp" if arg == "long" else "remat"
        c.model.stream_chunk_size = 128
        c.model.attention = "auto"
        c.batch_size = 8
        c.reference_batch_size = 8
        c.total_samples = 8 * 300
        c.optimizer.learning_rate = 5e-3
        c.schedule.warmup_samples = 8 * 30
        c.eval_batch_size = 16
        c.log_every_steps = 10
        c.eval_every_steps = 100
        c.checkpoint_every_steps = 100
    elif arg in ("context_ring", "pod_1b_128k"):
        # Context parallelism: the sequence split over the mesh axis 'context' (ring attention,
        # zig-zag causal load balancing). 'context_ring': 4,096 bytes on 8 (simulated) devices,
        # context = 8; 'pod_1b_128k': a 1B-parameter decoder (20 x 2048, MLP 8192) at 131,072
        # tokens on 64 devices (fsdp 8 x context 8), for `jaxbatch plan --devices 64`.
        pod = arg == "pod_1b_128k"
        length = 131_072 if pod else 4096
        c.dataset.options.seq_len = length
        c.model.max_len = length
        c.model.context_parallel = "ring"
        c.model.context_layout = "zigzag"
        c.model.attention = "auto"
        c.model.attention_chunk_size = 512
        c.model.backprop = "remat"
        c.loss.implementation = "auto"
        c.mesh.data = 1
        c.mesh.fsdp = 8 if pod else 1
        c.mesh.context = 8
        c.batch_size = 8 if pod else 1
        c.reference_batch_size = c.batch_size
        c.total_samples = c.batch_size * 1000
        c.schedule.warmup_samples = c.batch_size * 50
        c.noise.enabled = False
        c.eval_batch_size = c.batch_size
        if pod:
            c.model.width = 2048
            c.model.depth = 20
            c.model.heads = 16
            c.model.mlp_dim = 8192
            c.model.dtype = "bfloat16"
    elif arg == "adamw":
        c.optimizer.name = "adamw"
        c.optimizer.learning_rate = 3e-3
    elif arg == "runlocal":
        c.dataset.options.max_bytes = 200_000
        c.dataset.options.seq_len = 32
        c.model.max_len = 32
        c.model.width = 32
        c.model.mlp_dim = 64
        c.model.heads = 2
        c.batch_size = 32
        c.reference_batch_size = 32
        c.total_samples = 32 * 6
        c.schedule.warmup_samples = 32
        c.eval_batch_size = 64
        c.eval_every_steps = 0
        c.checkpoint_every_steps = 0
        c.log_every_steps = 2
    return c
