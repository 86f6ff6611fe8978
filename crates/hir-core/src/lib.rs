//! HIR core.
