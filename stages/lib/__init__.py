"""Small shared library of the stages: params, devices, I/O, preprocessing, models, tracking."""
