//! The API's tests, a file per concern.

mod openapi;
