"""Shared core of roadlabel: types, errors, model cards. Depends on numpy and pydantic only."""
