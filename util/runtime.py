"""Device selection and seeding."""
import torch

from util.errors import UserError


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; an unavailable CUDA request is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but CUDA is not available (use --device cpu or auto)")
    return torch.device(name)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed the global RNG (masking noise) from (seed, epoch, rank): epochs are reproducible alone."""
    torch.manual_seed((seed * 1_000_003 + epoch) * 997 + rank)
