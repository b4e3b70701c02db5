"""MPI: the rank-0 helpers every layer may use (:mod:`~maxwellhub.parallel.mpi`, each
also works without mpi4py: serial is MPI with one rank) and drivers in the same
``mpirun`` as the EM side (:mod:`~maxwellhub.parallel.mpmd`)."""
