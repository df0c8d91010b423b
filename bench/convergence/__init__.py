"""``python -m bench.convergence``: pre-train a small LLaMA on real text with every optimizer.

Every method trains the same model (transformers' ``LlamaForCausalLM`` built from a
tiny ``LlamaConfig``, vocab 256 = bytes, never downloaded) from the same initial
weights, on the same batches in the same order, under the same schedule (linear
warmup then cosine decay to 10% of the peak learning rate, as in the GaLore
scripts). Only the optimizer and its recipe change. Low-rank projection applies to
the attention and MLP weights only, chosen by
:func:`lowrank_kernels.optim.lowrank_param_groups`; embeddings, the LM head and the
norms get plain AdamW inside each optimizer, at the recipe's ``other_lr``.

Fairness (the protocol, :mod:`.protocol`, the default mode): every method's ``lr`` and
``other_lr`` come from a grid around its recipe scored on a TUNING split at half length
with the same budget (17 points, what AdamW's grid took; ``convergence_tuning-<method>.*``);
the table has the tuned row under the method's name and the paper recipe as a second
row ``"<method> (paper recipe)"`` where it differs, three seeds each, measured on a
separate VALIDATION split; a row is "within 5% of AdamW" only when its worst seed is.
``--no-tune`` runs the recipes as registered instead (the papers' values; the committed
AdamW pair comes from ``--tune adamw``, ``bench/results/convergence_tuning-adamw.*``). The ``frozen`` row is the control: the low-rank recipes' AdamW on embeddings,
head and norms with the projected weights frozen at initialization; each low-rank
method must end clearly below it. ``--seeds N`` repeats every method with N seeds
(initial weights and batch order) and reports the mean and spread.

Data (module :mod:`.data`): by default the Python standard library's own ``*.py``
files, split per file by the CRC32 of the relative path (0 mod 20: validation, 1 mod
20: tuning, else training). ``--data PATH`` takes a text file or a folder instead.

Output: a progress bar per run, a table (mean final validation loss, its spread,
optimizer-state bytes, peak memory, tokens/s, against AdamW and against the control),
``<out>/convergence.csv`` with exactly the columns ``method,final_val_loss,val_ppl,
state_bytes,peak_bytes,tokens_per_s`` (the loss is the mean over seeds),
``<out>/convergence.png`` (validation loss vs step, mean and min..max band over seeds)
and ``<out>/convergence.json`` (stamp: git describe with ``-dirty``, device; the
configuration, every run's curve, the summaries and the control verdicts).
``<out>`` is ``bench/out/`` by default (ignored by git); ``--out bench/results`` refreshes the
committed results, shown by docs/results.md after ``python -m bench.readme``.

What is measured:

- ``state_bytes``: the bytes of every tensor held in ``optimizer.state``, each storage
  once (:func:`lowrank_kernels.optim.state_nbytes`: moments, projectors or indices or
  seeds, step counters); for
  low-rank methods this includes the full AdamW state of the non-projected params.
- ``peak_bytes``: on CUDA, ``torch.cuda.max_memory_allocated`` after a reset, with the
  model built after the reset (weights + gradients + activations + optimizer state +
  temporaries). On CPU (Linux), the growth of the process's peak resident set
  (``VmHWM``, reset per run through ``/proc/self/clear_refs`` after ``malloc_trim``)
  over its resident set just before the model is built: coarser than the CUDA figure.
  Where ``/proc/self/clear_refs`` is unavailable, the ``ru_maxrss`` growth is reported.
- ``tokens_per_s``: training tokens divided by the wall time of the training steps
  (forward, backward, optimizer step, scheduler), evaluations excluded.

A method whose optimizer cannot be imported is listed as ``unavailable: <reason>``
and left out of the CSV; one that raises while training is listed as ``failed`` and
the command exits with status 1. Modules: :mod:`.presets`, :mod:`.data`,
:mod:`.recipes` (one entry per method), :mod:`.training`, :mod:`.report`,
:mod:`.tuning`, :mod:`.protocol`, :mod:`.cli`.
"""
import os

# Spinning OpenMP waiters make a CPU shared with other jobs many times slower; set
# before torch loads (effective for ``python -m bench.convergence``).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main, parse_args, run  # noqa: E402
from .data import SPLITS, Batches, Corpus, _is_validation, load_corpus, split_of  # noqa: E402
from .presets import PRESETS, Preset  # noqa: E402
from .recipes import HEADLINE, METHODS, PAPER_SUFFIX, RECIPES, TARGET_MODULES, Recipe, lowrank_builder, register  # noqa: E402
from .report import CLEAR_MARGIN_NATS, CSV_COLUMNS, Summary, acceptance, format_table, summarize  # noqa: E402
from .training import PeakMemory, Result, build_model, evaluate, lm_loss, lr_lambda, state_bytes, train_one  # noqa: E402

__all__ = [
    "main", "parse_args", "run", "SPLITS", "Batches", "Corpus", "load_corpus", "split_of", "PRESETS", "Preset",
    "HEADLINE", "METHODS", "PAPER_SUFFIX", "RECIPES", "TARGET_MODULES", "Recipe", "lowrank_builder", "register", "CLEAR_MARGIN_NATS",
    "CSV_COLUMNS", "Summary", "acceptance", "format_table", "summarize", "PeakMemory", "Result", "build_model",
    "evaluate", "lm_loss", "lr_lambda", "state_bytes", "train_one",
]
