//! Small service combinators the proxy stacks are built from.

/// Builds a service for each target, as `tower::MakeService` does, but synchronously: the
/// services here connect lazily, so building one never waits.
pub trait NewService<T> {
    type Service;

    /// A service for `target`.
    fn new_service(&self, target: T) -> Self::Service;
}

impl<F, T, S> NewService<T> for F
where
    F: Fn(T) -> S,
{
    type Service = S;

    fn new_service(&self, target: T) -> S {
        self(target)
    }
}
