"""`pursamere-fast summarise RUN`: placeholder, filled in below."""
