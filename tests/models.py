"""The tables the tests write to."""

from __future__ import annotations

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Row(Base):
    """One row written by one unit: ``owner`` says which unit, ``n`` which of its rows."""

    __tablename__ = "ss_rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(100))
    n: Mapped[int]


class Parent(Base):
    __tablename__ = "ss_parents"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    children: Mapped[list[Child]] = relationship(back_populates="parent")


class Child(Base):
    __tablename__ = "ss_children"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    parent_id: Mapped[int] = mapped_column(ForeignKey("ss_parents.id"))
    parent: Mapped[Parent] = relationship(back_populates="children")
