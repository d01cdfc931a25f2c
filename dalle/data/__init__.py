"""Pictures and captions: every data source behind one interface, and the built-in shapes data."""
