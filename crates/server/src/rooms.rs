//! Routes grouped by room: each room's module has its handlers, their OpenAPI operations and
//! the request and answer shapes only it uses, with its routes and its part of the document.
//! Registering a room's routes is its line in [`rooms!`].
//!
//! A room's refusals need nothing here: each names its code, title and kind
//! ([`farthing_payments::Room::explain`]), and [`crate::error`] answers them alike.

use axum::Router;
use utoipa::OpenApi;
use utoipa::openapi::OpenApi as Document;

use crate::App;

macro_rules! rooms {
    ($($module:ident),* $(,)?) => {
        $(mod $module;)*

        /// Every room's routes.
        pub fn router() -> Router<App> {
            Router::new()$(.merge($module::router()))*
        }

        /// Every room's operations, schemas and responses, to merge into the document.
        pub fn openapi() -> Document {
            let mut document = Document::default();
            $(document.merge($module::Api::openapi());)*
            document
        }
    };
}

rooms! {
    holds,
}
