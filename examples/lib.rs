//! Examples of embedding mcdist; see the `[[example]]` targets.
