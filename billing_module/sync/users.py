"""Users and organisations from the central platform (``users_cache``): the org rows carry
the customer discount that pricing applies."""
from .base import EntitySync, PageError


class UsersSync(EntitySync):
    entity = "users"

    def validate(self, items):
        # kind and discount are checked by Catalog.apply; a user must say whose it is
        for item in items:
            if isinstance(item, dict) and (item.get("kind") or item.get("entity_kind")) == "user" \
                    and not item.get("org_id"):
                raise PageError(f"users {str(item.get('id'))[:32]}: a user needs org_id (its organisation)")
