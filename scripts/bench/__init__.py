"""Benchmarks (`make bench`): training throughput and memory per fusion block, Lightning overhead,
input pipeline vs model, fusion scaling with grid and question length, a GPU mode that exposes the
step's fixed cost, and the kernels and host syncs of one training step.

    python scripts/benchmark.py                      # everything, quick-start sizes (< 10 min, 2 CPUs)
    python scripts/benchmark.py --sections overhead pipeline --repeats 7
    python scripts/benchmark.py --quick              # tiny sizes (what the tests run)
    python scripts/benchmark.py --sections gpu       # on a CUDA machine (scripts/gpu_check.sh)
    python scripts/benchmark.py --sections gpu --gpu-rows sweep graphs

Writes ``<out>/benchmark.json`` and ``<out>/benchmark.md`` (default ``logs/bench``) and prints the
markdown. Sections (``--sections``, by name or number):

1. ``fusions``: per ``configs/fusion/*.yaml``, training samples/s and peak memory of the quick-start
   composition (``experiment=quickstart fusion=<name>``), from images and from cached features.
2. ``overhead``: the Lightning module under a real ``Trainer`` vs the bare PyTorch loop below, same
   model, batches, precision, clipping, optimizer and schedule (tests prove the weights agree).
3. ``pipeline``: data-loader samples/s (quick-start ``num_workers``) vs the training step's rate;
   and the ``data=vqav2`` train loader at the VQA v2 recipe's 448 px on COCO-sized (640x480)
   JPEGs with 1 and 2 workers, the per-image cost of decode, resize and normalise in-process
   (PIL and ``torchvision.io.decode_jpeg``), and an extrapolation to 16 workers (labelled as such).
4. ``scaling``: fusion blocks alone (ResNet-101 layer3/layer4 channels, 768-d text) as the grid and
   the question grow, dense vs ``top_k`` sparse attention (folds the former model_stats.py).
5. ``gpu``: ResNet-101 @ 448 px + bert-base (random init), bf16-mixed, channels_last, rows chosen
   with ``--gpu-rows``: ``sweep`` (4 / 32 / 128 images of one question per step: the intercept of
   step time over images is the step's fixed cost), ``grouped`` (32 images x 5 questions, as VQA
   v2's 5.4), ``optimizer`` (AdamW foreach vs fused), ``lightning`` (Trainer vs bare loop),
   ``anchor`` (torchvision ResNet-101 alone, fused AdamW), ``e2e`` (``train.py
   experiment=vqav2_resnet101_bert`` on the synthetic set at 448 px, questions/s from step
   timestamps), ``graphs`` (eager vs ``torch.compile(mode="reduce-overhead")``, i.e. CUDA graphs),
   each with model-FLOPs utilisation. Without CUDA every row is recorded as skipped with its
   reason; ``--gpu-smoke`` runs the same code on CPU at tiny sizes (graphs still skipped there).
6. ``ops``: per fusion block, the aten ops (a proxy for kernel launches) and host syncs of one
   training step, bare loop and Lightning (``vqa.utils.op_counter``), with the most frequent ops.
   Device-independent, so it runs on a CPU too.
7. ``latency``: ``vqa.inference.Predictor`` answering one question at a time, a new image (cache
   miss) vs a follow-up question about an image already seen (cache hit), p50/p95, for the
   quick-start model and ResNet-101 @ 448 px + bert-base, with the time of each step.

Timings use ``--threads`` torch threads in every process (default 1: reproducible on a shared
machine; ``--threads 2`` on a quiet 2-core one). The header reports how much CPU other processes
took during the run.

The code, one module per part (no module imports one later in this list but ``cli``, which
imports the sections and the report):

- ``common``: sizes (``Sizes``, ``make_sizes``) and the run ``Context``, config composition and
  description, quiet logging, batches, the bare PyTorch loop (``BareLoop``, ``bare_fit``) and the
  Lightning run (``lightning_fit``), step timing, the tensor-memory tracker, RSS and CPU time,
  the feature store.
- ``fusions``, ``overhead``, ``pipeline``, ``scaling``, ``gpu``, ``ops``: one per section above
  (``section_<name>``); ``pipeline`` reuses ``fusions``' runner and ``gpu`` the ``ops`` counters.
- ``report``: the markdown writer (``markdown`` and one ``_md_<section>`` per section).
- ``cli``: ``parse_args``, ``main`` and ``run``. ``scripts/benchmark.py`` is its entry point.
"""
