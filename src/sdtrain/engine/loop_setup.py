"""The training loop's setup: devices and precision through accelerate, the optimizer and
schedule, the prepared forward, and the restore of a resumed run's state.

A mixin of engine.loop.Trainer, whose attributes it reads and sets.
"""

from __future__ import annotations

import logging

from sdtrain.engine.state import Counters
from sdtrain.errors import TrainingError
from sdtrain.seeds import derive_seed

logger = logging.getLogger("sdtrain.engine.loop")


class LoopSetup:
    """Builds what the loop runs on (`_setup`) and puts a resumed state in place (`_restore`)."""

    def _setup(self) -> None:
        import torch

        from sdtrain.engine.distributed import Processes, device_of, make_accelerator
        from sdtrain.engine.loss import LossRecipe
        from sdtrain.engine.noise import NoiseRecipe
        from sdtrain.engine.optim import build_optimizer
        from sdtrain.engine.precision import apply_precision, precision_for
        from sdtrain.engine.schedule import build_lr_scheduler
        from sdtrain.engine.step import StepContext

        training = self.sections.training
        if self.accelerator is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
            precision_for(training, self.no_half_vae, device_type)  # refuse fp16 on a CPU first
            self.accelerator = make_accelerator(training.mixed_precision)
        self.processes = Processes(self.accelerator)
        self.device = device_of(self.accelerator)
        self.precision = precision_for(training, self.no_half_vae, self.device.type)
        torch.manual_seed(derive_seed(self.seed, "init"))
        self.groups = self.method.prepare(self.bundle)
        bundle = self.bundle
        text_encoders = bundle.family.text_encoders(bundle)
        apply_precision([bundle.unet, *text_encoders], self.precision)
        # plain nn.Module.to: diffusers' own .to() warns about fp32-pinned modules we manage
        torch.nn.Module.to(bundle.vae, self.device, dtype=self.precision.vae)
        torch.nn.Module.to(bundle.unet, self.device)
        for text_encoder in text_encoders:
            torch.nn.Module.to(text_encoder, self.device)
        bundle.vae.requires_grad_(False)
        if training.gradient_checkpointing:
            bundle.unet.enable_gradient_checkpointing()
            if self.method.train_text_encoder():
                for text_encoder in text_encoders:
                    text_encoder.gradient_checkpointing_enable()
        self.params = [p for g in self.groups for p in g.params]
        self.built = build_optimizer(self.groups, self.sections.optimizer)
        self.optimizer = self.built.optimizer  # the optimizer itself (state dicts, eval/train)
        self.fused = None
        if self.sections.optimizer.fused_backward_pass:
            from sdtrain.engine.fused_backward import FusedBackward

            if self.processes.count > 1:
                raise TrainingError(
                    "fused_backward_pass updates each weight during backward, before the "
                    "processes could exchange gradients",
                    hint="train on one process, or drop fused_backward_pass",
                )
            self.fused = FusedBackward(self.optimizer, training.max_grad_norm)
        # the schedule runs in optimizer steps on every process: not prepared by accelerate
        # (its prepared scheduler steps once per process)
        self.scheduler = build_lr_scheduler(
            self.optimizer, self.sections.optimizer, self.steps.total_steps
        )
        from sdtrain.engine.distributed import ignore_frozen
        from sdtrain.engine.forward import TrainForward

        forward = TrainForward(self.method, bundle)
        self.zero = None
        deepspeed = self.accelerator.distributed_type.name == "DEEPSPEED"
        if deepspeed:
            from sdtrain.engine.zero import configure_zero

            configure_zero(
                self.accelerator.state.deepspeed_plugin,
                training.train_batch_size,
                self.steps.gradient_accumulation_steps,
                self.processes.count,
                training.max_grad_norm,
            )
        elif self.processes.count > 1:
            ignore_frozen(forward)
        # DDP with several processes (or DeepSpeed's engine), autocast with mixed precision,
        # the fp16 scaler
        self.forward, self.stepper = self.accelerator.prepare(forward, self.optimizer)
        if deepspeed:
            from sdtrain.engine.zero import ZeroTraining

            self.zero = ZeroTraining(self.forward)
        from sdtrain.engine.compile import compile_modules
        from sdtrain.engine.halfweights import has_frozen_half

        self.compiled = compile_modules(  # in place, inside whatever prepare wrapped around it
            training,
            [bundle.unet]
            + [te for te in text_encoders if any(p.requires_grad for p in te.parameters())],
            self.device.type,
            sum(2 * len(plan.buckets) for plan in self.data.datasets),
            deepspeed,
            not self.precision.autocast and has_frozen_half([bundle.unet, *text_encoders]),
        )
        if self.resume is None:  # a resumed run loads its state into place
            from sdtrain.engine.optim_state import prime_state

            # before any activation or gradient (see the module), after prepare: its device
            # placement round-trips the state dict, which bitsandbytes deep-copies
            prime_state(self.optimizer)
        self.scaler = self.accelerator.scaler
        from sdtrain.engine.host_sync import deferred_obstacle, use_deferred

        obstacle = deferred_obstacle(self.optimizer, self.fused, self.zero, self.method)
        self.deferred = use_deferred(training.host_sync, self.device.type, obstacle)
        if self.deferred:
            logger.info("host reads of each step deferred by one step (host_sync)")
        noise = NoiseRecipe(training, bundle.noise_scheduler, bundle.family.is_v)
        self.ctx = StepContext(
            self.method,
            bundle,
            noise,
            LossRecipe(training, noise),
            self.precision,
            self.device,
            forward=self.forward,
            compiled=self.compiled,
        )

    def _restore(self) -> Counters:
        if self.resume is None:
            return Counters(seed=self.seed, num_processes=self.processes.count)
        state = self.resume
        self.method.load_trainable_state(state.trainable)
        if self.zero is not None:  # this process's slices, and fp32 masters from the weights
            self.zero.load_optimizer_state(self.optimizer, state.optimizer)
        else:
            self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if self.scaler is not None and state.scaler is not None:
            self.scaler.load_state_dict(state.scaler)
        state.restore_global_rng()
        state.counters.num_processes = self.processes.count
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            state.folder,
            state.counters.global_step,
            state.counters.epoch,
            state.counters.position,
        )
        return state.counters
