"""Old home of the image and student loaders, kept so that earlier imports still work: images are
read by ``apm.data.read_images``, devices chosen by ``apm.precision.pick_device``, students loaded by
``APMModule.from_checkpoint`` (or ``apm.cli.load_student`` with configs) and written by
``apm.checkpoints``."""

from apm.checkpoints import read_student, save_pretrained
from apm.data import load_images, read_images
from apm.precision import pick_device

__all__ = ["load_images", "pick_device", "read_images", "read_student", "save_pretrained"]
