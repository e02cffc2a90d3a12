"""One click command per DVC stage: parse options, call `deeper`, write outputs. Kept thin."""
