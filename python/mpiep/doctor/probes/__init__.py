"""The doctor's probes, one module per subsystem. Each ``probe_*`` fills its part of a
:class:`~mpiep.doctor.report.Report` and adds findings; none fails on a missing tool."""
