//! sglora
