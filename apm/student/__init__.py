"""Old home of the APM student, kept so that ``from apm.student import APMStudent`` still works:
the student lives in ``apm.students.apm``."""

from apm.students.apm import LEVEL_ENTRIES, RGB, APMStudent

__all__ = ["APMStudent", "LEVEL_ENTRIES", "RGB"]
