"""Training engine shared by the tasks: optimiser / schedule, loop, checkpoints, distributed set-up."""
from .checkpoint import save_atomic
from .distributed import init_distributed, is_main
from .optim import WarmupSchedule, build_optimizer, build_scheduler, layer_ids, param_groups
from .sampler import ResumableSampler
from .trainer import TrainConfig, Trainer

__all__ = ["save_atomic", "init_distributed", "is_main", "WarmupSchedule", "build_optimizer", "build_scheduler",
           "layer_ids", "param_groups", "ResumableSampler", "TrainConfig", "Trainer"]
