"""What people read: grids of small images (gallery.py), Markdown tables (tables.py)."""
