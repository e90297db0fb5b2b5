"""The `report` group (configured by `conf/report/`): what a store says, as figures and a page (`page`), and as
TensorBoard scalars beside the training loss (`tensorboard`, `report.tensorboard=DIR`)."""

from .numbers import summary_table
from .page import default_out_dir, write_report

__all__ = ["default_out_dir", "summary_table", "write_report"]
