"""Students: the ``Student`` interface (``base.py``), a registry of students and their settings
(``registry.py``), and two implementations: APM's field student (``apm.py``) and GLOM (``glom.py``).
docs/adding_a_student.md shows how to add one."""

from apm.students.apm import APMSettings, APMStudent
from apm.students.base import RGB, Student, StudentSettings
from apm.students.glom import GLOMSettings, GLOMStudent
from apm.students.registry import (create_student, list_students, register_student, settings_record,
                                   student_settings)

register_student("apm", APMSettings)(APMStudent)
register_student("glom", GLOMSettings)(GLOMStudent)

__all__ = ["APMSettings", "APMStudent", "GLOMSettings", "GLOMStudent", "RGB", "Student", "StudentSettings",
           "create_student", "list_students", "register_student", "settings_record", "student_settings"]
