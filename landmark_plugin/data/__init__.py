"""Dataparsers (synthetic-city, matrixcity), the city generator, and input validation."""
