"""Pure domain types and rules: changes here when the product's meaning changes.

Imports msgspec and the standard library only (a test over the imports keeps it so).
"""
