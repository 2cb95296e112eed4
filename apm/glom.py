"""Old home of the GLOM student, kept so that ``from apm.glom import GLOMStudent`` still works:
the student lives in ``apm.students.glom``."""

from apm.students.glom import *  # noqa: F401,F403
