"""Tools around the trainer: doctor (is this machine right?), bench (how fast?), export."""
