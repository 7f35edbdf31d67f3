"""Tabby felix: policy calculation, simulation and (later) the dataplane agent."""
