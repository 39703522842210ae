"""Host-side fuzzing of the parsers (pydbd) and a pure model of the driver's snapshot semantics."""
