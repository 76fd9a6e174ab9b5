"""Run outputs: one JSON line per epoch in log.txt, and TensorBoard scalars."""
import json
import os
from typing import Any, Dict, List, Optional

from util.checkpoint import atomic_write
from util.errors import UserError
from util.runfiles import parse_log, read_log, read_text


class RunLogger:
    def __init__(self, output_dir: str, enabled: bool = True):
        self.output_dir, self.enabled = output_dir, enabled
        self.path = os.path.join(output_dir, "log.txt")
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
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"could not write {self.path} ({e.strerror or e}); the checkpoint is saved: "
                            f"rerun the same command once the disk has room")
        self.scalars(record, record["epoch"] if step is None else step, prefix="epoch/")
        self.tb.flush()

    def records(self) -> List[Dict[str, Any]]:
        """The log's records; a cut-off last line (a kill while appending) is dropped, any other
        malformed line is a one-line error (util/runfiles.py)."""
        return read_log(self.path, drop_cut_tail=True)

    def last_epoch(self) -> int:
        records = self.records()
        return records[-1]["epoch"] if records else -1

    def rewind(self, epoch: int) -> None:
        """Keep only the lines of epochs before `epoch`: the log then matches the checkpoint (and a
        cut-off last line is gone)."""
        text = read_text(self.path) if self.enabled else None
        if text is None:
            return
        kept = "".join(json.dumps(r) + "\n" for r in parse_log(text, self.path, drop_cut_tail=True)
                       if r["epoch"] < epoch)
        if kept != text:
            atomic_write(self.path, kept.encode())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

