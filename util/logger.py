"""Run outputs: one JSON line per epoch in log.txt, and TensorBoard scalars."""
import json
import os
from typing import Any, Dict, Optional


class RunLogger:
    def __init__(self, output_dir: str, enabled: bool = True):
        self.output_dir, self.enabled = output_dir, enabled
        self._tb = None

    @property
    def tb(self):
        if self._tb is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow import
            self._tb = SummaryWriter(log_dir=os.path.join(self.output_dir, "tensorboard"))
        return self._tb

    def scalars(self, values: Dict[str, float], step: int, prefix: str = "") -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"{prefix}{key}", value, step)

    def epoch(self, record: Dict[str, Any], step: Optional[int] = None) -> None:
        """Append a JSON line to log.txt and mirror numeric values to TensorBoard."""
        if not self.enabled:
            return
        with open(os.path.join(self.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(record) + "\n")
        self.scalars(record, record["epoch"] if step is None else step, prefix="epoch/")
        self.tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
