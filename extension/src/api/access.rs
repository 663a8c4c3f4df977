//! The owner check every capability check starts with, in Rust because it runs on every
//! enqueue: `superuser()` and role membership are answered from backend caches, where the
//! equivalent SQL would plan and run a catalog query each time.

use crate::text::Utf8;
use pgrx::prelude::*;

/// True for superusers and members of `picloud_admin`: they act on every app (internal).
#[pg_extern(stable, parallel_safe, name = "_is_owner")]
pub fn picloud_is_owner() -> bool {
    // SAFETY: superuser() and GetUserId() read the current backend's state.
    if unsafe { pg_sys::superuser() } {
        return true;
    }
    // SAFETY: get_role_oid with missing_ok returns InvalidOid instead of raising.
    let admin = unsafe { pg_sys::get_role_oid(c"picloud_admin".as_ptr(), true) };
    if admin == pg_sys::InvalidOid {
        return false;
    }
    // SAFETY: membership lookup through the backend's role-membership cache.
    unsafe { pg_sys::is_member_of_role(pg_sys::GetUserId(), admin) }
}

/// How a principal stands (internal): 0 = the role does not exist, 1 = superuser or member of
/// picloud_admin (may run any app's handlers), 2 = an ordinary role (needs the app's admin
/// capability). Answered from backend caches, once per handler run.
#[pg_extern(stable, parallel_safe, strict, name = "_role_standing")]
pub fn picloud_role_standing(principal: Utf8) -> i32 {
    let Ok(name) = std::ffi::CString::new(principal.0) else {
        return 0;
    };
    // SAFETY: get_role_oid with missing_ok returns InvalidOid instead of raising.
    let role = unsafe { pg_sys::get_role_oid(name.as_ptr(), true) };
    if role == pg_sys::InvalidOid {
        return 0;
    }
    // SAFETY: superuser_arg reads the role's catalog entry through the syscache.
    if unsafe { pg_sys::superuser_arg(role) } {
        return 1;
    }
    // SAFETY: as in picloud_is_owner.
    let admin = unsafe { pg_sys::get_role_oid(c"picloud_admin".as_ptr(), true) };
    // SAFETY: membership lookup through the backend's role-membership cache.
    if admin != pg_sys::InvalidOid && unsafe { pg_sys::is_member_of_role(role, admin) } {
        return 1;
    }
    2
}
