"""Frozen teachers whose layers are GLOM's levels: the interface, a registry, one file per adapter."""

from teachers.base import Level, Teacher
from teachers.registry import create_teacher, list_teachers, register_teacher

__all__ = ["Level", "Teacher", "create_teacher", "list_teachers", "register_teacher"]
