"""What a run is asked to do: options, job files, durations, dated paths, prices."""
