r"""BERT-Large pre-training with LAMB at batch 64K / 32K, in the two phases of the LAMB paper.

Plan it on this machine (compile-only, 256 simulated devices):

  jaxbatch plan --config configs/bert_lamb.py:phase1 --devices 256
  jaxbatch plan --config configs/bert_lamb.py:phase2 --devices 256

Prepare pre-masked examples once per phase (``scripts/prepare_bert_data.py``: WordPiece ids
from any tokenizer in an ``.npz``, ``--special bert_uncased --vocab_size 30522``; phase 1 with
``--seq_len 128 --max_predictions 20``, phase 2 with ``--seq_len 512 --max_predictions 80``;
splits 'train' and 'test'), then train on a pod (see BUILD.md "Scale-out"):

  jaxbatch train --config configs/bert_lamb.py:phase1 \
      --config.dataset.options.data_dir=/data/bert128 --workdir runs/bert_p1
  jaxbatch train --config configs/bert_lamb.py:phase2 --config.init_from=runs/bert_p1 \
      --config.dataset.options.data_dir=/data/bert512 --workdir runs/bert_p2

(phase 2 starts from phase 1's weights with a fresh LAMB state and step, ``config.init_from``;
the workdir must be a path every host sees, e.g. a shared file system).

Expected (LAMB paper, Table 1): SQuAD v1.1 F1 ≈ 90.6 after fine-tuning, from 8,599 steps in total
(7,038 at batch 65,536 and sequence 128, then 1,563 at batch 32,768 and sequence 512); not run by
jaxbatch (no pod, no fine-tuning pipeline).

Hyper-parameters (the LAMB paper's 64K/32K mixed-batch recipe, as released in NVIDIA's BERT LAMB
scripts): LAMB with β1 = 0.9, β2 = 0.999, ε = 1e-6, weight decay 0.01 (not on biases and
LayerNorm), linear warm-up then linear decay to 0; phase 1: peak lr 6e-3, warm-up 28.43 % of its
7,038 steps, 20 masked predictions per 128-token sequence; phase 2: peak lr 4e-3, warm-up 12.8 %
of its 1,563 steps, 80 predictions per 512-token sequence. ``--config.batch_size`` rescales the
learning rate by the square-root rule the LAMB paper uses. bf16 compute, float32 parameters;
the vocabulary of 30,522 WordPieces is padded to 30,528 so the tensor axis can split it.

The model is trained on the masked-LM objective only (no next-sentence prediction; see
``jaxbatch.nn.bert.BertMLM``), on pre-masked examples in the format of BERT's
``create_pretraining_data.py`` (``jaxbatch.train.tasks_mlm``).

References: You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes" (ICLR), Section 4.1 and Table 1; Devlin et al. 2019, "BERT", Appendix A.2.

``get_config('runlocal')`` is a tiny BERT used by the tests to build, plan and train it on 8 CPU
devices.
"""

from jaxbatch.train.config import default_config

PHASES = {
    # phase: (batch, sequence length, masked predictions, peak lr, steps, warm-up fraction)
    "phase1": (65536, 128, 20, 6e-3, 7038, 0.2843),
    "phase2": (32768, 512, 80, 4e-3, 1563, 0.128),
}


def get_config(arg: str | None = None):
    variant = arg or "phase1"
    if variant not in (*PHASES, "runlocal"):
        raise ValueError(
            f"bert_lamb: unknown variant {variant!r}; expected one of {[*PHASES, 'runlocal']}"
        )
    batch, seq_len, predictions, lr, steps, warmup = PHASES.get(variant, PHASES["phase1"])
    c = default_config()
    c.task = "mlm"
    c.seed = 0

    c.dataset.name = "bert_pretraining"
    c.dataset.options.seq_len = seq_len
    c.dataset.options.max_predictions = predictions
    c.dataset.options.data_dir = ""  # set on the command line (scripts/prepare_bert_data.py)

    c.model.name = "bert_mlm"
    c.model.vocab_size = 30528
    c.model.width = 1024
    c.model.depth = 24
    c.model.heads = 16
    c.model.mlp_dim = 4096
    c.model.max_len = 512
    c.model.dropout = 0.1
    c.model.scan_layers = True
    c.model.remat_policy = "none"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"

    c.batch_size = batch
    c.reference_batch_size = batch
    c.total_samples = steps * batch
    c.scaling.learning_rate = "sqrt"

    c.optimizer.name = "lamb"
    c.optimizer.learning_rate = lr
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.01
    c.optimizer.mask = "exclude_bias_and_norm"

    c.schedule.name = "warmup_linear"
    c.schedule.warmup_samples = round(warmup * steps) * batch
    c.schedule.end_lr_fraction = 0.0

    c.eval_batch_size = 4096
    c.log_every_steps = 20
    c.checkpoint_every_steps = 500

    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    if variant == "runlocal":
        c.dataset.options.seq_len = 32
        c.dataset.options.max_predictions = 5
        c.model.update(vocab_size=512, width=32, depth=2, heads=4, mlp_dim=64, max_len=32)
        c.model.dtype = "float32"
        c.batch_size = c.reference_batch_size = 64
        c.total_samples = 64 * 4
        c.schedule.warmup_samples = 64
        c.eval_batch_size = 64
    return c
