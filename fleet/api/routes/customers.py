"""Customers: the organisations that own sites.

Coordinators (and admins) write; ops read; a customer viewer reads only its own customer,
and other customers' ids answer 404 as if they did not exist.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel, ConfigDict

from fleet.api.deps import SessionDep, require
from fleet.api.schemas import (
    CONFLICT,
    ERRORS,
    NOT_FOUND,
    CustomerIdPath,
    Name,
    Page,
    PageDep,
    SearchText,
    registry_errors,
)
from fleet.db.models import Role, User
from fleet.services import registry

router = APIRouter(prefix="/customers", tags=["customers"], responses=ERRORS)

Reader = Annotated[User, Depends(require(Role.coordinator, Role.ops, Role.customer_viewer))]
Writer = Annotated[User, Depends(require(Role.coordinator))]


class CustomerCreate(BaseModel):
    """A new customer; names are unique."""

    name: Name


class CustomerUpdate(BaseModel):
    """Fields to change; omitted fields stay as they are."""

    name: Name | None = None


class CustomerPublic(BaseModel):
    """A customer as the API shows it."""

    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    created_ms: int


@router.post("", response_model=CustomerPublic, status_code=status.HTTP_201_CREATED,
             responses=CONFLICT)
def post_customer(body: CustomerCreate, user: Writer, session: SessionDep) -> CustomerPublic:
    """Create a customer (409 if the name is taken)."""
    with registry_errors():
        customer = registry.create_customer(session, name=body.name, actor=user)
    return CustomerPublic.model_validate(customer)


@router.get("", response_model=Page[CustomerPublic])
def list_customers(user: Reader, session: SessionDep, page: PageDep,
                   q: SearchText = None) -> Page[CustomerPublic]:
    """Customers by name; a customer viewer sees only its own."""
    with registry_errors():
        rows, total = registry.list_customers(
            session, scope=registry.customer_scope(user), q=q, offset=page.offset,
            limit=page.limit)
    return Page(items=[CustomerPublic.model_validate(r) for r in rows], total=total,
                offset=page.offset, limit=page.limit)


@router.get("/{customer_id}", response_model=CustomerPublic, responses=NOT_FOUND)
def get_customer(customer_id: CustomerIdPath, user: Reader,
                 session: SessionDep) -> CustomerPublic:
    """One customer."""
    with registry_errors():
        customer = registry.get_customer(session, customer_id=customer_id,
                                         scope=registry.customer_scope(user))
    return CustomerPublic.model_validate(customer)


@router.patch("/{customer_id}", response_model=CustomerPublic,
              responses={**NOT_FOUND, **CONFLICT})
def patch_customer(customer_id: CustomerIdPath, body: CustomerUpdate, user: Writer,
                   session: SessionDep) -> CustomerPublic:
    """Rename a customer (409 if the name is taken)."""
    with registry_errors():
        customer = registry.update_customer(session, customer_id=customer_id, name=body.name,
                                            actor=user)
    return CustomerPublic.model_validate(customer)


@router.delete("/{customer_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={**NOT_FOUND, **CONFLICT})
def delete_customer(customer_id: CustomerIdPath, user: Writer, session: SessionDep) -> None:
    """Delete a customer that has no sites and no users (409 says which remain)."""
    with registry_errors():
        registry.delete_customer(session, customer_id=customer_id, actor=user)
