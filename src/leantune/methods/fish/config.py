"""``FishConfig``: the options of FISH masks."""

from __future__ import annotations

from dataclasses import dataclass

from leantune.config import MethodConfig, check_choice, check_positive, check_range, option
from leantune.errors import ConfigError

MASK_TYPES = ("fisher", "random", "bitfit")
MODES = ("sparse", "masked")


@dataclass
class FishConfig(MethodConfig):
    """Train a fixed sparse mask of entries chosen by Fisher information (or a random / bias baseline)."""

    method = "fish"

    keep_ratio: float = option(
        0.005, "Fraction of all parameters to train (k = keep_ratio x all params); the task head counts inside k."
    )
    mask_type: str = option(
        "fisher", "How entries are chosen: fisher (top-k Fisher score), random (same budget), bitfit (every bias)."
    )
    fisher: str = option(
        "empirical",
        "empirical: gradients of the loss on the true label (the paper's runs); expected: exact expectation over "
        "the model's predicted class distribution (classification heads only, one backward per class).",
    )
    grad_type: str = option("square", "Per-example gradient statistic summed into the score: square or absolute.")
    num_samples: int = option(1024, "Training examples (batch 1) used for the Fisher scores.")
    mode: str = option(
        "sparse", "sparse: train k values + index buffers (memory in proportion to k); masked: dense masked grads."
    )
    mask_path: str | None = option(None, "Reuse a mask saved by save_mask() instead of computing one.")
    seed: int = option(0, "Seed of the random mask baseline.")
    num_workers: int = option(
        1, "Build disjoint masks for this many periodic-merge workers: top num_workers x k entries dealt by rank."
    )

    def validate(self) -> None:
        check_positive(self, "keep_ratio", "num_samples", "num_workers")
        check_range(self, "keep_ratio", 0.0, 1.0, high_inclusive=True)
        check_choice(self, "mask_type", MASK_TYPES)
        check_choice(self, "fisher", ("empirical", "expected"))
        check_choice(self, "grad_type", ("square", "absolute"))
        check_choice(self, "mode", MODES)
        if self.num_workers > 1 and self.mask_type == "bitfit":
            raise ConfigError(f"FishConfig.num_workers={self.num_workers!r} deals top-k entries out to workers; "
                              "mask_type 'bitfit' has no ranking (use fisher or random)")
