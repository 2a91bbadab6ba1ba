"""Load tests of sdserve: locust user classes for the real traffic mix, a runner that serves the
tiny model locally (or targets a cluster), an SLO checker and a step-load search."""
