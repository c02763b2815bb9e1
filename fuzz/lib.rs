//! Fuzz targets for mcdist (cargo-fuzz).
