"""Where things run: the process group from the launcher (`runtime`), which process owns which
submodel and how their tensors travel (`placement`), and data-parallel replicas (`replicas`)."""
