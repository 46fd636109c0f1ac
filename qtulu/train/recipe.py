"""The training run: QLoRA on packed rows, one class with setup, train and save_checkpoint.

The inner loop is written out (no Trainer): each optimizer step reads its rows, counts the
labelled tokens of the WHOLE step first (all micro-batches, all processes: one all-reduce), then
runs forward + backward per micro-batch with the summed loss divided by that count. So every
token weighs the same, however the step is split into micro-batches or processes (a mean of
micro-batch means would weigh a short micro-batch's tokens more).

Several processes (torchrun / accelerate launch, DDP): each reads its own share of the step's rows;
because every process divides by the GLOBAL count, the step's gradient is the SUM of the processes'
gradients, which one all-reduce per step gives them all (sync_gradients) before clipping, so every
process clips the same norm, takes the same NaN decision and makes the same update. Stopping on a
signal is agreed by all (an all-gather of the flags per step), checkpoints are written by the main
process with each process's RNG state beside them (checkpoint.py), and only the main process
writes metrics, logs and the progress bar.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from qtulu.config import RunConfig, combination_errors, dump_config, parse_overrides
from qtulu.errors import QtuluError
from qtulu.files import building_dir
from qtulu.model.lora import folds_kept
from qtulu.train.batches import Position, StepBatches, collate, count_tokens
from qtulu.train.checkpoint import (
    check_run_dir,
    complete_checkpoints,
    finish_checkpoint,
    load_adapter,
    load_checkpoint,
    save_adapter,
    start_checkpoint,
    write_rank_optimizer,
    write_rank_rng,
    write_text_atomic,
)
from qtulu.train.fsdp import accumulating, full_adapter_state
from qtulu.train.launch import launcher_world_size
from qtulu.train.loss import decoder_and_head, micro_batch_loss
from qtulu.train.metrics import MetricsLog, peak_memory_bytes, read_metrics
from qtulu.train.optim import build_optimizer, build_scheduler, total_steps

GB = 1024**3
# the LoRA gradients are summed across processes in buckets of this many elements (fp32): a flat
# copy of all of them at once would double their memory (r=64 on 65B: ~1.6 GB more per GPU)
BUCKET_ELEMENTS = 16 * 1024 * 1024


class TrainingInterrupted(QtuluError):
    """Ctrl-C or SIGTERM: a checkpoint was saved; exit 130 (SIGINT) or 143 (SIGTERM)."""

    collective = True  # every process stops after the same step (the flag is agreed on)


def collective(err: QtuluError) -> QtuluError:
    """Mark an error that every process raises at the same point (a check of shared state, a value
    reduced across processes): the CLI prints it once, from the main process."""
    err.collective = True
    return err


def finish_together(say) -> None:
    """The main process calls `say()`; then every process waits for the others (see cli.train)."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        say()
    state.wait_for_everyone()


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def with_overrides(cfg: RunConfig, flags: list[str]) -> RunConfig:
    """`cfg` with `--section.key VALUE` flags applied (the planner's advice is phrased as flags)."""
    tree = cfg.model_dump(mode="json")
    for key, value, _ in parse_overrides(flags):
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return RunConfig.model_validate(tree)


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.checkpoint.output_dir.replace("{name}", cfg.name)).expanduser()


class LoraFinetune:
    """A QLoRA fine-tuning run of `cfg`. resume: True (must), False (must not), None (if possible)."""

    def __init__(self, cfg: RunConfig, resume: bool | None = None, force: bool = False,
                 console: Console | None = None):
        from accelerate import PartialState

        self.cfg, self.resume, self.force = cfg, resume, force
        # rank and world size from the launcher; one process without one. accelerate sets up a CPU
        # (gloo) process group only when told the run is on the CPU: otherwise, with no GPU, each of
        # the launched processes would quietly believe it is alone.
        self.dist = PartialState(cpu=cfg.launch.device == "cpu" or not torch.cuda.is_available())
        self.rank, self.world = self.dist.process_index, self.dist.num_processes
        self.is_main = self.dist.is_main_process
        self.console = console or Console(highlight=False)
        self.run_dir = run_dir_of(cfg)
        self.config_text = dump_config(cfg)
        self.stop_signal: int | None = None

    def say(self, text: str) -> None:
        if self.is_main:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    # -----------------------------------------------------------------------------------------
    # setup

    def setup(self) -> None:
        from qtulu.model.load import pick_device

        cfg = self.cfg
        try:
            self._check_launch()
            self.resume_from = check_run_dir(self.run_dir, cfg.model_dump(mode="json"), self.resume, self.world,
                                             cfg.launch.strategy)
        except QtuluError as e:
            raise collective(e) from None  # the same checks of the same files in every process
        self.device = pick_device(cfg)
        self._check_memory()
        self.tokenizer = self._main_first(self._load_tokenizer)
        self.dataset = self._prepare_data()
        self.batches = StepBatches(self.dataset, cfg.optim.batch_size, cfg.optim.micro_batch_size, cfg.optim.seed,
                                   self.rank, self.world)
        self.total = total_steps(cfg.optim, self.batches.steps_per_epoch)
        # The LoRA initialisation is the same in every process and for any number of processes (and
        # then copied from the main one, as DDP would); dropout then draws from a stream per process.
        seed_everything(cfg.optim.seed)
        self.model = self._build_model()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.param_counts = self.model.get_nb_trainable_parameters()  # whole, before any sharding
        self._broadcast_params()
        if self.resume_from is not None:
            load_adapter(self.resume_from, self.model, self.rank)  # whole, before any sharding
        # FSDP's root (the sharded decoder), or None: one process, or DDP's full copy per process
        self.root = None
        if cfg.launch.strategy == "fsdp" and self.world > 1:
            from qtulu.train.fsdp import param_bytes, shard_decoder

            decoder = decoder_and_head(self.model)[0]
            whole = param_bytes(decoder)
            self.root = shard_decoder(self.model, self.device)
            embedding = param_bytes(decoder.get_input_embeddings())
            self.shards = (param_bytes(self.root) - embedding, whole - embedding, embedding)
            self.params = [p for p in self.model.parameters() if p.requires_grad]  # this process's shards
        seed_everything(cfg.optim.seed + self.rank)
        self.optimizer, note = build_optimizer(self.params, cfg.optim, self.device)
        if note:
            self.say(f"note: {note}")
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total)
        self.step, self.position, self.skipped, self.elapsed_before = 0, Position(), 0, 0.0
        self.saved_step: int | None = None
        self.metrics_lines: list[str] = []
        if self.resume_from is not None:
            self._restore(self.resume_from)
        elif self.is_main:
            self._start_run_dir()
        self._summary()

    def _check_launch(self) -> None:
        """The config must describe the processes that really run (the CLI resolves launch.num_gpus
        from the launcher; this guards every other way in)."""
        cfg, world = self.cfg, self.world
        if cfg.launch.num_gpus != world:
            raise QtuluError(f"launch.num_gpus: {cfg.launch.num_gpus}, but {world} process(es) were launched; start "
                             f"{cfg.launch.num_gpus} processes (torchrun --nproc_per_node {cfg.launch.num_gpus} "
                             "\"$(which qtulu)\" train ...) or drop launch.num_gpus", 2)
        problems = combination_errors(cfg, launcher_world_size())  # the checks load_config makes
        if problems:
            raise QtuluError("; ".join(f"{key}: {msg}" for key, msg in problems), 2)

    def _main_first(self, build):
        """`build()` in the main process first, then in each machine's first process, then in the rest:
        what it writes into a cache (the tokenizer, a random-init model, a download) the later ones
        find instead of racing to write it too."""
        with self.dist.main_process_first(), self.dist.local_main_process_first():
            return build()

    def _broadcast_params(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            for p in self.params:
                dist.broadcast(p.data, src=0)

    def _check_memory(self) -> None:
        """Stop before loading anything when `qtulu plan` says the run cannot fit this device."""
        import psutil

        from qtulu.model.plan import advice, detected_gpu_memory_gb, estimate, verdict

        if self.cfg.model.arch is None:
            return  # no architecture numbers: nothing to plan with
        if self.device.type == "cuda":
            budget = int((self.cfg.launch.gpu_memory_gb or detected_gpu_memory_gb()) * GB)
            where = f"{torch.cuda.get_device_name(self.device)}"
        else:
            budget, where = psutil.virtual_memory().available, "CPU RAM available"
        self.plan = estimate(self.cfg, self.device.type)
        self.budget, self.budget_where = budget, where
        if verdict(self.cfg, self.plan, budget) == "does not fit" and not self.force:
            tips = advice(self.cfg, budget, lambda extra: with_overrides(self.cfg, extra))
            raise QtuluError(f"memory: qtulu plan estimates {self.plan.total / GB:.1f} GiB, {where} has "
                             f"{budget / GB:.1f} GiB; try {tips[0]}, or pass --force to run anyway", 2)

    def _load_tokenizer(self):
        from qtulu.model.tokenizer import load_tokenizer

        return load_tokenizer(self.cfg.model.tokenizer or self.cfg.model.name_or_path, self.cfg.model.revision)

    def _prepare_data(self):
        from qtulu.data.prepare import PreparedDataset, prepare_dataset, tokenizer_fingerprint

        cfg = self.cfg
        packing = "bfd" if cfg.data.packing and cfg.model.attention != "sdpa" else "padded"
        cache = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else self.run_dir.parent / "data"
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.data.mix.name)[:60]
        variant = "" if (cfg.data.labels, cfg.data.bos) == ("tulu", "auto") else f"-{cfg.data.labels}-bos{cfg.data.bos}"
        fingerprint = tokenizer_fingerprint(self.tokenizer)[:10]
        folder = cache / f"{slug}-{cfg.data.max_seq_len}-{packing}{variant}-{fingerprint}"
        if self.is_main:  # one process prepares; the others wait for it
            prepare_dataset(cfg.data.mix, cfg.data.sources_dir, self.tokenizer, cfg.data.max_seq_len, cfg.data.seed,
                            folder, packing=packing, labels=cfg.data.labels, bos=cfg.data.bos,
                            log=lambda msg: self.say(f"data: {msg}"))
        self.dist.wait_for_everyone()
        self.packed = cfg.model.attention != "sdpa"
        return PreparedDataset(folder)

    def _build_model(self):
        from qtulu.model.attention import use_varlen_attention
        from qtulu.model.load import base_model_dir, build_model

        cfg = self.cfg
        self._check_vocab(self._main_first(lambda: base_model_dir(cfg)))
        model = build_model(cfg, self.device)
        base = model.get_base_model()
        if cfg.model.attention == "qtulu":
            use_varlen_attention(base)
        else:
            name = {"flash_attn": "flash_attention_2", "sdpa": "sdpa"}[cfg.model.attention]
            try:
                base.set_attn_implementation(name)
            except (ImportError, ValueError) as e:
                raise QtuluError(f"model.attention: {cfg.model.attention} is not usable here ({e})".splitlines()[0]
                                 + "; use --model.attention qtulu", 2) from None
        model.train()
        return model

    def _check_vocab(self, folder: Path) -> None:
        """The tokenizer's ids must exist in the base model's embedding table."""
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(folder).vocab_size
        if len(self.tokenizer) > vocab:
            raise QtuluError(f"model.tokenizer: {len(self.tokenizer)} tokens, but the base model {folder} has "
                             f"{vocab} embeddings; use the tokenizer that belongs to the model")

    def _start_run_dir(self) -> None:
        """A fresh run: config, the tokenizer with the chat template, an empty metrics file."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
        write_text_atomic(self.run_dir / "config.yaml", self.config_text)
        with building_dir(self.run_dir / "tokenizer", replace=True) as tmp:
            shutil.copytree(self.dataset.tokenizer_dir(), tmp, dirs_exist_ok=True)
        write_text_atomic(self.run_dir / "metrics.jsonl", "")

    def _restore(self, folder: Path) -> None:
        state = load_checkpoint(folder, self.optimizer, self.rank, sharded=self.root is not None)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.skipped, self.elapsed_before = state["step"], state["skipped_steps"], state["elapsed_s"]
        self.saved_step = self.step
        self.position = Position(**state["position"])
        # metrics after the checkpoint belong to steps that will run again
        text = (folder / "metrics.jsonl").read_text()
        self.metrics_lines = text.splitlines(keepends=True)
        if self.is_main:
            write_text_atomic(self.run_dir / "metrics.jsonl", text)

    def _summary(self) -> None:
        cfg, stats = self.cfg, self.dataset.manifest["stats"]
        trainable, total = self.param_counts
        start = f"resuming from step {self.step}" if self.resume_from is not None else "fresh start"
        per_step = cfg.optim.micro_batch_size * self.world
        self.say(f"qtulu train: run {cfg.name} -> {self.run_dir} ({start})")
        self.say(f"  model   {cfg.model.name_or_path} on {self.device}, "
                 f"{'4-bit ' + cfg.quant.quant_type if cfg.quant.load_in_4bit else cfg.quant.compute_dtype}, "
                 f"LoRA r{cfg.lora.r} a{cfg.lora.alpha:g} on {','.join(cfg.lora.target_modules)}: "
                 f"{trainable / 1e6:.2f}M trainable of {total / 1e6:.1f}M parameters, attention {cfg.model.attention}, "
                 f"{'fused' if cfg.model.fused_loss else 'full-logit'} loss")
        if self.device.type == "cpu":
            from qtulu.model.cpu_memory import allocator_note

            self.say(f"  memory  CPU allocator {allocator_note(cfg.launch.cpu_allocator)}")
        if self.root is not None:
            held, whole, embedding = self.shards
            self.say(f"  shards  process {self.rank} holds {held / 2**20:.4g} MiB of the decoder's {whole / 2**20:.4g} "
                     f"MiB of parameters (4-bit layers, norms, LoRA); the input embedding whole "
                     f"({embedding / 2**20:.4g} MiB)")
        if getattr(self, "plan", None) is not None:
            self.say(f"  memory  plan {self.plan.total / GB:.2f} GiB; {self.budget_where}: {self.budget / GB:.1f} GiB")
        self.say(f"  data    {cfg.data.mix.name}: {len(self.dataset)} rows of <= {self.dataset.max_seq_len} tokens, "
                 f"{stats['documents']} documents, {stats['tokens']:,} tokens ({stats['trainable_tokens']:,} "
                 f"trainable), packing efficiency {stats['packing_efficiency']:.3f}")
        self.say(f"  steps   {self.total} ({self.batches.steps_per_epoch} per epoch), "
                 f"batch {cfg.optim.batch_size} rows "
                 f"= {cfg.optim.batch_size // per_step} x {cfg.optim.micro_batch_size} x {self.world} "
                 f"process(es), lr {cfg.optim.lr:g} {cfg.optim.schedule}")

    # -----------------------------------------------------------------------------------------
    # train

    def _on_signal(self, signum, frame) -> None:
        # only sets the flag: _step_end makes the processes agree on it at the end of the step
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.stop_signal = signum
        self.say(f"\n{signal.Signals(signum).name}: finishing step {self.step + 1}, then saving a checkpoint "
                 "(Ctrl-C again to abort without saving)")

    def train(self) -> None:
        if self.step >= self.total:
            self.say(f"nothing to do: the run is complete ({self.step} of {self.total} steps)")
            self._write_final()
            return
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        log = MetricsLog(self.run_dir / "metrics.jsonl", self.cfg.logging.report_to, self.cfg.name,
                         self.cfg.model_dump(mode="json"), self.cfg.logging.log_every_steps) if self.is_main else None
        try:
            self._loop(log)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if log:
                log.close()
        self._write_final()

    def _loop(self, log: MetricsLog | None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        cfg, device = self.cfg, self.device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        fault = os.environ.get("QTULU_FAULT", "")
        started = time.perf_counter()
        live = self.is_main and self.console.is_terminal
        progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"), TimeRemainingColumn(),
                            console=self.console, disable=not live)
        with progress:
            task = progress.add_task("train", total=self.total, completed=self.step, loss="-", tps="-")
            while self.step < self.total:
                t0 = time.perf_counter()
                micro, next_position = self.batches.next_step(self.position)
                tokens, targets = count_tokens([r for m in micro for r in m])
                # the step's denominator, from every micro-batch of every process, before any backward
                counts = self._sum(torch.tensor([tokens, targets], dtype=torch.float64, device=device))
                n_targets = max(1.0, float(counts[1]))
                batches = [collate(m, self.packed, pad_id, device) for m in micro]
                data_s = time.perf_counter() - t0

                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                # FSDP divides the gradients it reduces by the number of processes: undo it, for a sum
                scale = self.world if self.root is not None else 1
                with folds_kept():  # the adapter holds still until optimizer.step(): fold it once
                    for i, batch in enumerate(batches):
                        with accumulating(self.root, last=i == len(batches) - 1):
                            loss = micro_batch_loss(self.model, batch, cfg.model.fused_loss)
                            if fault == f"nan-loss@{self.step + 1}":  # fault injection for the NaN-guard test
                                loss = loss * float("nan")
                            (loss * scale / n_targets).backward()
                        loss_sum += loss.detach().double()
                step_loss = float(self._sum(loss_sum)) / n_targets
                self.sync_gradients()  # before clipping: every process clips the same, global, norm
                max_norm = cfg.optim.max_grad_norm or float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm) if self.root is None
                                  else self.root.clip_grad_norm_(max_norm))  # the norm of all shards
                lr = self.scheduler.get_last_lr()[0]
                # loss and norm are reduced values, the same in every process: so is this decision
                if math.isfinite(step_loss) and math.isfinite(grad_norm):
                    self.optimizer.step()
                elif cfg.optim.on_nonfinite == "stop":
                    self._stop_nonfinite(step_loss, grad_norm)
                else:
                    self.skipped += 1
                    self.say(f"step {self.step + 1}: non-finite loss {step_loss} / grad norm {grad_norm}; update "
                             f"skipped ({self.skipped} so far)")
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step, self.position = self.step + 1, next_position
                if fault == f"stop@{self.step}" and self.rank == self.world - 1:
                    # fault injection: the last process alone acts as if SIGTERM had reached it in this step
                    self.stop_signal = signal.SIGTERM
                stop, peaks = self._step_end(peak_memory_bytes(device))
                step_s = time.perf_counter() - t0

                record = {
                    "step": self.step,
                    "epoch": round(self.position.epoch + self.position.index
                                   / (self.batches.steps_per_epoch * cfg.optim.batch_size), 6),
                    "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens": int(counts[0]), "trainable_tokens": int(counts[1]),
                    "tokens_per_s": round(float(counts[0]) / step_s, 2),
                    "peak_memory_bytes": max(peaks), "peak_memory_bytes_per_rank": peaks,
                    "elapsed_s": round(self.elapsed_before + time.perf_counter() - started, 3),
                    "data_s": round(data_s, 6), "step_s": round(step_s, 6), "skipped_steps": self.skipped,
                }
                self.metrics_lines.append(_json_line(record))
                if log:
                    log.write(record)
                progress.update(task, completed=self.step, loss=f"{step_loss:.4f}", tps=f"{record['tokens_per_s']:.0f}")
                if not live and self.is_main and self.step % cfg.logging.log_every_steps == 0:
                    self.say(f"step {self.step}/{self.total}  loss {step_loss:.4f}  lr {lr:.3g}  grad {grad_norm:.3g}"
                             f"  {record['tokens_per_s']:.0f} tok/s")
                if self.step % cfg.checkpoint.save_every_steps == 0 or self.step == self.total:
                    self.save_checkpoint(record["elapsed_s"])
                if stop:
                    self._stop_on_signal(record["elapsed_s"], stop)

    # -----------------------------------------------------------------------------------------
    # what the processes exchange (nothing, in one process)

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sync_gradients(self) -> None:
        """Sum the LoRA gradients over the processes, in place.

        A sum, not DDP's mean: every process divided its loss by the labelled-token count of the
        whole step (all processes), so its gradient is its share of the step's gradient and the
        shares add up. One all-reduce per bucket of flattened fp32 gradients after the last
        micro-batch (bf16 adapters are summed in fp32 too); the backward of the next micro-batch
        never needs them, so there is nothing to gain from DDP's hooks and no_sync here, only
        its averaging to undo.
        """
        if self.world == 1 or self.root is not None:
            return  # FSDP reduce-scattered them in the backward
        import torch.distributed as dist

        for p in self.params:
            if p.grad is None:  # a process whose share never reached this parameter still adds zeros
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        for i, p in enumerate(self.params):
            bucket.append(p.grad)
            if sum(g.numel() for g in bucket) >= BUCKET_ELEMENTS or i == len(self.params) - 1:
                flat = torch.cat([g.reshape(-1).float() for g in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                for g, summed in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                    g.copy_(summed.view_as(g))
                bucket = []

    def _step_end(self, peak: int) -> tuple[int, list[int]]:
        """(the signal every process stops on, 0 for none; each process's peak memory). One all-gather
        per step: a signal may reach one process (or reach them at different moments), yet all must
        stop after the same step, or the ones still training would wait for the others forever."""
        mine = [int(self.stop_signal or 0), int(peak)]
        if self.world == 1:
            return mine[0], [mine[1]]
        import torch.distributed as dist

        local = torch.tensor(mine, dtype=torch.int64, device=self.device)
        gathered = [torch.zeros_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local)
        rows = [t.tolist() for t in gathered]
        return max(r[0] for r in rows), [r[1] for r in rows]

    def _stop_nonfinite(self, loss: float, grad_norm: float) -> None:
        last = complete_checkpoints(self.run_dir)
        kept = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was saved before it"
        raise collective(QtuluError(f"step {self.step + 1}: non-finite loss {loss} (grad norm {grad_norm}); stopped, "
                                    f"{kept}. Lower optim.lr, or set --optim.on_nonfinite skip to drop such updates"))

    def _stop_on_signal(self, elapsed: float, signum: int) -> None:
        if self.saved_step != self.step:
            self.save_checkpoint(elapsed)
        args = [a for a in sys.argv[1:] if a not in ("--resume", "--no-resume")]
        name = signal.Signals(signum).name
        how = (f"qtulu {shlex.join(args)} --resume" if self.world == 1 else
               f"the same launch command ({self.world} processes) with --resume added, e.g. torchrun "
               f"--nproc_per_node {self.world} \"$(which qtulu)\" {shlex.join(args)} --resume")
        err = TrainingInterrupted(f"{name}: stopped after step {self.step} of {self.total}; checkpoint saved in "
                                  f"{self.run_dir / 'checkpoints'}. Resume with: {how}")
        err.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM
        raise err

    # -----------------------------------------------------------------------------------------
    # saving

    def save_checkpoint(self, elapsed: float) -> Path | None:
        """Every process takes part: the main one writes what they share (adapter, optimizer,
        scheduler, data position, metrics), each writes its own RNG state beside it, and the main one
        completes the folder only once all of those are in. Returns the folder (main process)."""
        tmp = start_checkpoint(self.run_dir, self.step) if self.is_main else None
        if self.world > 1:
            import torch.distributed as dist

            box = [tmp]
            dist.broadcast_object_list(box, src=0)  # the temporary folder's name, to every process
            tmp = box[0]
        write_rank_rng(tmp, self.rank)
        adapter_state = None
        if self.root is not None:
            write_rank_optimizer(tmp, self.optimizer, self.rank)
            adapter_state = full_adapter_state(self.model, self.root)  # every process takes part
        self.dist.wait_for_everyone()  # every RNG file is in before the main process completes the folder
        folder = None
        if self.is_main:
            state = {
                "step": self.step, "total_steps": self.total, "position": vars(self.position),
                "scheduler": self.scheduler.state_dict(), "skipped_steps": self.skipped, "elapsed_s": elapsed,
                "world_size": self.world, "strategy": self.cfg.launch.strategy,
            }
            folder = finish_checkpoint(tmp, self.run_dir, self.step, self.model,
                                       self.optimizer if self.root is None else None, state, self.config_text,
                                       "".join(self.metrics_lines), self.cfg.checkpoint.keep_last, adapter_state)
        # nobody goes on (or exits, on a signal) before the checkpoint is complete: a launcher stops
        # every process once one exits, and the next save would clean this one's temporary folder
        self.dist.wait_for_everyone()
        self.saved_step = self.step
        return folder

    def _write_final(self) -> None:
        """The run's adapter (PEFT format) and a one-line summary naming the next command."""
        adapter_state = full_adapter_state(self.model, self.root) if self.root is not None else None
        if not self.is_main:
            return
        with building_dir(self.run_dir / "adapter", replace=True) as tmp:
            save_adapter(self.model, tmp, adapter_state)
        metrics = read_metrics(self.run_dir / "metrics.jsonl")
        last = f", final loss {metrics[-1]['loss']:.4f}" if metrics else ""
        self.say(f"done: {self.step} steps{last}; adapter in {self.run_dir / 'adapter'}. "
                 f"Next: qtulu merge {self.run_dir}")


def _json_line(record: dict) -> str:
    import json

    return json.dumps(record) + "\n"


def train_run(cfg: RunConfig, resume: bool | None = None, force: bool = False, console: Console | None = None):
    """`qtulu train`: set up, train, save. Returns the run folder."""
    run = LoraFinetune(cfg, resume=resume, force=force, console=console)
    run.setup()
    run.train()
    return run.run_dir
