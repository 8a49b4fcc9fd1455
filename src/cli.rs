//! Command-line interface (clap). Every flag is declared once here.
